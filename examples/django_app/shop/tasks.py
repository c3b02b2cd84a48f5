"""The shop's jobs. A plain ``def`` task runs in one of the worker's threads, where the
Django ORM works as in a view (each thread has its own database connection)."""

from urllib.parse import quote

from django.db import close_old_connections
from django.db.backends.base.base import BaseDatabaseWrapper

import pgtasks

from .models import Order

app = pgtasks.App()  # PGTASKS_DSN, else DATABASE_URL: the database Django uses


@app.task(queue="orders")
def confirm_order(order_id: int) -> None:
    try:
        Order.objects.filter(id=order_id).update(confirmed=True)
    finally:
        close_old_connections()  # as Django does at the end of a request


def database_url(connection: BaseDatabaseWrapper) -> str:
    """A ``postgresql://`` URL of the database a Django connection uses (its test
    database, under the test runner)."""
    s = connection.settings_dict
    user = quote(s["USER"] or "", safe="")
    password = f":{quote(s['PASSWORD'], safe='')}" if s["PASSWORD"] else ""
    at = f"{user}{password}@" if user else ""
    host, port = s["HOST"] or "localhost", s["PORT"] or "5432"
    if host.startswith("/"):  # a unix socket's directory
        return f"postgresql://{at}/{quote(s['NAME'])}?host={quote(host)}&port={port}"
    return f"postgresql://{at}{host}:{port}/{quote(s['NAME'])}"
