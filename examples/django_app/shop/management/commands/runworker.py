"""``python manage.py runworker [pgtasks worker options]``: the pgtasks worker, with
Django set up (its options as for ``python -m pgtasks worker``, e.g. ``-c 20 --processes 2``)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

import pgtasks.cli


class Command(BaseCommand):
    help = "Run the pgtasks worker for the shop's jobs."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("worker_args", nargs="*", help="options of `pgtasks worker`")

    def handle(self, *args: Any, **options: Any) -> None:
        status = pgtasks.cli.main(["worker", "--app", "shop.worker:app", *options["worker_args"]])
        if status:
            raise SystemExit(status)
