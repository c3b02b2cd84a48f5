"""A Flask app that defers jobs from its (synchronous) views.

``POST /signup`` creates a user and defers the welcome email in the same SQLAlchemy
transaction: both commit, or neither does. ``POST /reports`` defers a job without a
transaction of its own (``defer_sync`` on the app's background event loop). Both tasks are
plain ``def``s, run in the worker's threads.

    PGTASKS_DSN=postgresql://localhost/app python -m pgtasks migrate --app flask_app:tasks
    PGTASKS_DSN=postgresql://localhost/app flask --app flask_app run
    PGTASKS_DSN=postgresql://localhost/app python -m pgtasks worker --app flask_app:tasks
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from flask import Flask, request

import pgtasks

DSN = os.environ.get("PGTASKS_DSN") or os.environ["DATABASE_URL"]
engine = sa.create_engine(DSN.replace("postgresql://", "postgresql+psycopg://", 1))
metadata = sa.MetaData()
users = sa.Table(
    "flask_users",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("email", sa.Text, nullable=False, unique=True),
    sa.Column("welcomed", sa.Boolean, nullable=False, server_default=sa.false()),
)

tasks = pgtasks.App(DSN)


@tasks.task(queue="flask_email")
def send_welcome_email(user_id: int) -> None:
    with engine.begin() as conn:  # here: mark the user welcomed (an email in real life)
        conn.execute(users.update().where(users.c.id == user_id).values(welcomed=True))


@tasks.task(queue="flask_reports")
def build_report(kind: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())


app = Flask(__name__)


@app.post("/signup")
def signup() -> tuple[dict[str, object], int]:
    email = request.form["email"]
    try:
        with engine.begin() as conn:  # one transaction: the user and the job
            user_id = conn.execute(
                users.insert().values(email=email).returning(users.c.id)
            ).scalar_one()
            job = send_welcome_email.options(cursor=conn).defer_sync(user_id)
    except sa.exc.IntegrityError:
        return {"error": f"{email} has signed up already"}, 409  # and no job was sent
    return {"user": user_id, "job": job.id}, 201


@app.post("/reports")
def reports() -> tuple[dict[str, object], int]:
    job = build_report.defer_sync(request.form.get("kind", "users"))
    return {"job": job.id}, 202


with engine.begin() as conn:
    metadata.create_all(conn)
