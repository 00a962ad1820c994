"""The front layer: pure ASGI middleware that every request passes before a route."""

from gateway.middleware.cors import cors_middleware
from gateway.middleware.front import GatewayMiddleware

__all__ = ["GatewayMiddleware", "cors_middleware"]
