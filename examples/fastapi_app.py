"""A FastAPI app whose route defers a job that a worker in the same process runs.

    pip install -e '.[embedded,fastapi]' uvicorn
    uvicorn examples.fastapi_app:api
    curl -X POST 'localhost:8000/signup?email=ada@example.com'

The worker starts and stops with the app (its lifespan). In production you may prefer
separate worker processes (`python -m pgtasks worker --app examples.fastapi_app:app`):
the same App serves both.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

import pgtasks
from pgtasks.integrations.fastapi import worker_lifespan

logger = logging.getLogger(__name__)
app = pgtasks.App()


@app.task(queue="signups")
async def send_welcome_email(email: str) -> None:
    logger.info("welcome email sent to %s", email)


api = FastAPI(lifespan=worker_lifespan(app, concurrency=10))


@api.post("/signup")
async def signup(email: str) -> dict[str, int]:
    ref = await send_welcome_email.defer(email=email)
    return {"job": ref.id}
