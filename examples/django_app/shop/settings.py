"""Settings of the example shop. The database is ``DATABASE_URL`` (or ``PGTASKS_DSN``), a
``postgresql://user:password@host:port/name`` URL: the same database pgtasks uses, so that
a job can be deferred in the transaction that creates an order."""

import os
from urllib.parse import parse_qs, unquote, urlsplit

_url = urlsplit(os.environ.get("DATABASE_URL") or os.environ["PGTASKS_DSN"])
_query = {k: v[0] for k, v in parse_qs(_url.query).items()}  # ?host=/socket/dir, ...

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["shop"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "shop.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(_url.path.lstrip("/")),
        "USER": unquote(_url.username or ""),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _query.get("host", _url.hostname or ""),
        "PORT": _query.get("port", str(_url.port or "")),
    }
}
