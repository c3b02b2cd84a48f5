"""The shop's tests, run by Django's own test runner (``python manage.py test``) on the test
database it creates and migrates: pgtasks' schema comes with the migrations."""

import asyncio

from django.db import connection
from django.test import TestCase, TransactionTestCase

from .models import Order
from .tasks import app, database_url


def queued_orders() -> list[int]:
    """The order ids of the jobs waiting in the ``orders`` queue, as this connection sees
    them (inside a TestCase: inside its transaction)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('pgmq.q_orders') IS NOT NULL")
        (exists,) = cursor.fetchone()
        if not exists:
            return []
        cursor.execute("SELECT (message->'kwargs'->>'order_id')::bigint FROM pgmq.q_orders")
        return [row[0] for row in cursor.fetchall()]


class OrderTests(TestCase):
    def test_an_order_and_its_job_are_created_together(self) -> None:
        response = self.client.post("/orders", {"item": "tea", "quantity": 2})
        self.assertEqual(response.status_code, 200)
        order = Order.objects.get()
        self.assertEqual(response.json()["order"], order.id)
        self.assertEqual(queued_orders(), [order.id])

    def test_a_failed_order_leaves_no_job(self) -> None:
        response = self.client.post("/orders", {"item": "tea", "quantity": 99})
        self.assertEqual(response.status_code, 409)
        self.assertFalse(Order.objects.exists())
        self.assertEqual(queued_orders(), [])  # rolled back with the order


class WorkerTests(TransactionTestCase):
    """Committed for real (no test transaction), then run by a pgtasks worker on the test
    database; the task confirms the order through the ORM."""

    def test_the_worker_confirms_the_order(self) -> None:
        response = self.client.post("/orders", {"item": "coffee", "quantity": 1})
        self.assertEqual(response.status_code, 200)
        self.client.post("/orders", {"item": "coffee", "quantity": 50})  # rolled back

        async def run_worker() -> None:
            app.database.use_dsn(database_url(connection))  # the test database
            try:
                await app.worker(burst=True).run()
            finally:
                await app.close()

        asyncio.run(run_worker())
        order = Order.objects.get()
        self.assertTrue(order.confirmed)
        self.assertEqual(queued_orders(), [])
