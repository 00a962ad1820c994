"""The front layer: pure ASGI middleware that every request passes before a route."""

from gateway.middleware.front import GatewayMiddleware

__all__ = ["GatewayMiddleware"]
