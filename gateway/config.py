"""Configuration types: frozen, typed values the whole gateway reads.

``gateway.configfile`` turns a YAML file (with ``${VAR}`` interpolation) into a ``Config``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = [
    "Bucket",
    "CacheConfig",
    "CircuitConfig",
    "ClientConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "FanoutConfig",
    "LoggingConfig",
    "MetricsConfig",
    "RateLimit",
    "RateLimitConfig",
    "RedisConfig",
    "Secret",
    "ServerConfig",
    "UpstreamConfig",
    "hash_key",
    "redacted",
]


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret:
    """A string that never shows itself in a ``repr``, a ``str`` or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def hash_key(key: str) -> str:
    """The hex SHA-256 digest under which a caller key is stored and compared."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """Browser origins allowed to call the gateway; ``("*",)`` allows every origin."""

    allow_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the gateway listens. ``secret_key`` signs the URLs the gateway hands out;
    ``public_url`` (no trailing slash; empty when unset) is where callers reach it."""

    host: str = "0.0.0.0"
    port: int = 8080
    # The C# upstream accepts bodies of about 30 MB: a blend of two phone photos fits.
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    cors: CorsConfig = CorsConfig()
    secret_key: Secret = field(default_factory=lambda: Secret(""))
    public_url: str = ""


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Empty ``url`` and no ``sentinels`` select the embedded in-process store.

    ``cluster: true`` treats ``url`` as one node of a Redis Cluster. ``sentinels`` (host:port
    entries) find the master of ``service_name``; ``url`` then only lends its password and db.
    """

    url: Secret = field(default_factory=lambda: Secret(""))
    key_prefix: str = "mjgate"
    socket_timeout_s: float = 0.25
    max_connections: int = 64
    pool_timeout_s: float = 0.5
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = "mymaster"

    @property
    def enabled(self) -> bool:
        return bool(self.url.reveal() or self.sentinels)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    base_url: str
    key: Secret
    auth: Literal["mj-api-secret", "bearer"] = "mj-api-secret"  # how it wants its key
    list_by_ids_path: str = "/mj/task/list-by-condition"
    supports_query: bool = False
    weight: float = 1.0
    timeout_s: float = 15.0
    max_rps: float = 20.0
    max_concurrency: int = 32
    # How long a request may wait for the outbound caps before it fails as saturated.
    queue_timeout_s: float = 2.0
    # The most bytes (after decompression) accepted in one answer; task JSON is far smaller.
    max_response_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``rps`` tokens a second, up to ``burst`` at once.

    ``submit`` and ``query`` optionally give those route classes buckets of their own, so
    that polling cannot use up the budget for submits.
    """

    rps: float
    burst: int
    submit: Bucket | None = None
    query: Bucket | None = None

    def for_class(self, route_class: str) -> tuple[str, Bucket]:
        """The bucket name and size that a request of this class spends from."""
        own = self.submit if route_class == "submit" else self.query
        return (route_class, own) if own is not None else ("all", Bucket(self.rps, self.burst))


@dataclass(frozen=True, slots=True)
class Bucket:
    rps: float = 10.0
    burst: int = 20


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A caller. It may hold several keys at once (``key_sha256`` and
    ``extra_key_sha256s``), so a key can be rotated without downtime."""

    name: str
    key_sha256: str  # the digest of the client's first key
    rate_limit: RateLimit | None = None
    upstreams: tuple[str, ...] | None = None
    admin: bool = False  # may use the /admin/... routes (cache purge)
    extra_key_sha256s: tuple[str, ...] = ()

    @property
    def key_sha256s(self) -> tuple[str, ...]:
        """The digest of every key this client may present."""
        first = (self.key_sha256,) if self.key_sha256 else ()
        return (*first, *self.extra_key_sha256s)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    default: RateLimit = field(default_factory=lambda: RateLimit(Bucket().rps, Bucket().burst))
    on_store_error: Literal["allow", "deny"] = "allow"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    terminal_ttl_s: int = 604800
    l1_max_entries: int = 100_000
    inflight_ttl_ms: int = 1000
    not_found_ttl_ms: int = 2000
    owner_ttl_s: int = 40 * 86400
    l1_max_bytes: int = 256 * 1024 * 1024
    # An L1 entry is re-read from the store after this long, which bounds how long a worker
    # can serve a body that another worker invalidated.
    l1_ttl_s: int = 30
    image_expiry_margin_s: int = 300


@dataclass(frozen=True, slots=True)
class FanoutConfig:
    max_ids: int = 500
    deadline_s: float = 10.0
    batch_size: int = 100


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    """Per upstream and per worker: this many consecutive failures open the circuit for
    ``cooldown_s``; then one probe request decides whether it closes again."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    path: str = "/metrics"
    token: Secret = field(default_factory=lambda: Secret(""))  # empty: no token needed


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: tuple[UpstreamConfig, ...]
    clients: tuple[ClientConfig, ...]
    allow_anonymous: bool = False
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = field(default_factory=RedisConfig)
    rate_limit: RateLimitConfig = RateLimitConfig()
    cache: CacheConfig = CacheConfig()
    fanout: FanoutConfig = FanoutConfig()
    passthrough: tuple[str, ...] = ()
    circuit: CircuitConfig = CircuitConfig()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = LoggingConfig()


def redacted(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with every secret replaced, for display."""
    data: dict[str, Any] = _plain(config)
    data["redis"]["url"] = _redact_url(config.redis.url.reveal())
    # As written in a config file, so the output can be pasted back.
    data["redis"]["sentinels"] = [f"{host}:{port}" for host, port in config.redis.sentinels]
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, Secret):
        return "<redacted>" if value.reveal() else ""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _redact_url(url: str) -> str:
    """The URL with its password hidden, whether in the netloc or (as redis-py also reads
    it) in a ``password=`` query parameter."""
    parts = urlsplit(url)
    if parts.password:
        user = f"{parts.username}:" if parts.username else ":"
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}<redacted>@{host}")
    if parts.query:
        fields = (item.partition("=") for item in parts.query.split("&"))
        query = "&".join(
            f"{name}=<redacted>" if name.lower() == "password" else f"{name}{eq}{value}"
            for name, eq, value in fields
        )
        parts = parts._replace(query=query)
    return parts.geturl()
