from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from .models import Order
from .tasks import confirm_order

STOCK = 10


class OutOfStock(Exception):
    pass


@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    """Create an order and defer its confirmation in one transaction: both exist, or, when
    anything in the block fails (here: too few in stock), neither does."""
    try:
        with transaction.atomic():
            order = Order.objects.create(
                item=request.POST["item"], quantity=int(request.POST["quantity"])
            )
            with connection.cursor() as cursor:
                job = confirm_order.options(cursor=cursor).defer_sync(order.id)
            if order.quantity > STOCK:
                raise OutOfStock(order.item)
    except OutOfStock:
        return JsonResponse({"error": "out of stock"}, status=409)
    return JsonResponse({"order": order.id, "job": job.id})
