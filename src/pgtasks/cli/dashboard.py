"""``pgtasks dashboard``: serve the web dashboard (the ``dashboard`` extra) on its own.

It checks the schema first (one line "run migrate" rather than a broken page), then serves
until Ctrl-C or SIGTERM. On 127.0.0.1 by default; any other address needs credentials
(``--basic-auth USER:PASSWORD`` or ``PGTASKS_DASHBOARD_AUTH``), which every request must then
carry.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from ..app import App
from ..db import schema


async def _check(app: App) -> None:
    try:
        await schema.check_installed(await app.pool())
    finally:
        await app.close()


def run_dashboard(app: App, args: argparse.Namespace) -> int:
    from ..dashboard import security, server  # the dashboard extra, only for this command

    auth = args.basic_auth or os.environ.get("PGTASKS_DASHBOARD_AUTH") or None
    credentials = security.parse_credentials(auth) if auth else None
    server.check_bind(args.host, credentials)
    asyncio.run(_check(app))
    print(
        f"pgtasks dashboard at http://{args.host}:{args.port}/"
        + (" (basic auth)" if credentials else "")
        + (" (read-only)" if args.read_only else ""),
        flush=True,
    )
    server.serve(
        app, host=args.host, port=args.port, credentials=credentials, read_only=args.read_only
    )
    return 0
