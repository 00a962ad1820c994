"""How the simulated upstream behaves: ``SimSettings`` and the flavors it imitates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FLAVOR_AUTH",
    "FLAVOR_NOT_FOUND",
    "RUNTIME_FIELDS",
    "AuthStyle",
    "Flavor",
    "ListPaths",
    "NotFoundStyle",
    "SimSettings",
]

Flavor = Literal["java", "csharp", "relay"]
AuthStyle = Literal["mj-api-secret", "bearer", "csharp"]
NotFoundStyle = Literal["empty", "204", "null", "400", "404"]
ListPaths = Literal["both", "list-by-ids", "list-by-condition"]

FLAVOR_AUTH: dict[str, AuthStyle] = {"java": "mj-api-secret", "csharp": "csharp", "relay": "bearer"}
FLAVOR_NOT_FOUND: dict[str, NotFoundStyle] = {"java": "empty", "csharp": "204", "relay": "400"}
# Settings /_sim/faults may change at run time.
RUNTIME_FIELDS = (
    "latency_ms",
    "error_rate",
    "error_status",
    "timeout_rate",
    "hang_s",
    "queue_full_rate",
    "failure_rate",
    "task_seconds",
    "echo_key",
)


@dataclass(frozen=True, slots=True)
class SimSettings:
    """How the simulated upstream behaves. ``None`` for auth/not_found means the flavor's."""

    flavor: Flavor = "java"
    key: str | None = None
    auth: AuthStyle | None = None
    not_found: NotFoundStyle | None = None
    list_paths: ListPaths = "both"
    supports_query: bool = True
    task_seconds: float = 8.0
    failure_rate: float = 0.1
    image_ttl_s: int = 86400
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500  # the status of injected errors: 500, 502, 503, 429...
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    queue_full_rate: float = 0.0
    seed: int | None = None
    # JSON error answers (C# and relay flavors) quote the sim's key, as some relays do.
    echo_key: bool = False

    def __post_init__(self) -> None:
        for name in ("failure_rate", "error_rate", "timeout_rate", "queue_full_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        for name in ("task_seconds", "latency_ms", "hang_s", "image_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.flavor not in FLAVOR_AUTH:
            raise ValueError(f"flavor must be one of {', '.join(FLAVOR_AUTH)}")
