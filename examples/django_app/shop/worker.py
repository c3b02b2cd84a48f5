"""The pgtasks app with Django set up, for the worker command outside manage.py:

    python -m pgtasks worker --app shop.worker:app --processes 2

(each worker process imports this module, so each sets Django up). Inside manage.py:
``python manage.py runworker``."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
django.setup()

from shop.tasks import app  # noqa: E402

__all__ = ["app"]
