"""Installs pgmq and the pgtasks schema with Django's own migrations, so that every database
Django migrates has them, its test database included. Idempotent, like ``pgtasks migrate``;
it runs on a connection of its own, outside Django's transaction."""

import asyncio

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

import pgtasks


def install_pgtasks(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    from shop.tasks import database_url

    async def migrate() -> None:
        async with pgtasks.App(database_url(schema_editor.connection)) as app:
            await app.migrate()

    asyncio.run(migrate())


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("shop", "0001_initial")]
    operations = [migrations.RunPython(install_pgtasks, migrations.RunPython.noop)]
