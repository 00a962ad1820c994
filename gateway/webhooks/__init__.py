"""Task callbacks mjgate delivers: Standard Webhooks signatures, allowed destinations only,
from a durable queue in the store, retried and dead-lettered."""

from gateway.webhooks.deliveries import Deliveries, Delivery, State
from gateway.webhooks.destinations import Destinations, forbidden_address
from gateway.webhooks.signing import message_id, signature, webhook_headers

__all__ = [
    "Deliveries",
    "Delivery",
    "Destinations",
    "State",
    "forbidden_address",
    "message_id",
    "signature",
    "webhook_headers",
]
