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
    "ImagesConfig",
    "LedgerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "Quota",
    "QuotaConfig",
    "RateLimit",
    "RateLimitConfig",
    "RedisConfig",
    "S3Config",
    "Secret",
    "ServerConfig",
    "SubmitConfig",
    "UpstreamConfig",
    "Visibility",
    "WatcherConfig",
    "WebhookConfig",
    "WebhooksConfig",
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
    # Submits to it carry mjgate's own notifyHook (needs server.public_url and secret_key).
    push: bool = False


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


# Which tasks a caller sees: every task, its team's (its own included), or only its own.
Visibility = Literal["all", "team", "own"]


@dataclass(frozen=True, slots=True)
class Quota:
    """Submits a caller may make per UTC day and per UTC month (None: no limit).
    ``refund_failed`` gives a unit back for each task that ends FAILURE."""

    submits_per_day: int | None = None
    submits_per_month: int | None = None
    refund_failed: bool = False


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Where a caller's task callbacks go when a submit names no ``notifyHook``, and the
    Standard Webhooks secret (``whsec_<base64>``) they are signed with; empty: unsigned."""

    url: str = ""
    secret: Secret = field(default_factory=lambda: Secret(""))


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
    team: str = ""  # empty: in no team
    visibility: Visibility = "all"
    quota: Quota | None = None  # None: quota.default
    webhook: WebhookConfig = field(default_factory=WebhookConfig)

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
    # The largest task body either tier keeps: a larger answer is served, never cached.
    max_value_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FanoutConfig:
    max_ids: int = 500
    deadline_s: float = 10.0
    batch_size: int = 100


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """The quota of every client without one of its own."""

    default: Quota = Quota()


@dataclass(frozen=True, slots=True)
class SubmitConfig:
    """The same submit body from the same caller within ``dedup_window_s`` is answered with
    the first one's answer instead of being sent again (0: off)."""

    dedup_window_s: float = 10.0


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """How long submits are remembered (fractions of a day allowed), and when a task that
    has not finished counts as stuck."""

    retention_days: float = 30.0
    stuck_after_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class WatcherConfig:
    """The fleet's one refresher of running tasks (a leader lease in the store): every
    ``interval_s``, or ``queued_interval_s`` for tasks still queued (None: the same)."""

    enabled: bool = True
    interval_s: float = 2.0
    queued_interval_s: float | None = None

    @property
    def queued_every_s(self) -> float:
        return self.interval_s if self.queued_interval_s is None else self.queued_interval_s


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    """Task callbacks mjgate delivers. ``allow``: destinations that may be called (hosts,
    ``host:port``s, CIDRs); empty, none is. A failed delivery is tried again after
    ``backoff_s``, doubling up to ``backoff_max_s``, ``max_attempts`` times in all; then it
    is a dead letter."""

    allow: tuple[str, ...] = ()
    max_attempts: int = 10
    backoff_s: float = 1.0
    backoff_max_s: float = 600.0
    timeout_s: float = 10.0  # one delivery attempt


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


# Discord's and Midjourney's CDNs. Wildcards: these hosts must resolve to public addresses.
DEFAULT_IMAGE_HOSTS = ("*.discordapp.com", "*.discordapp.net", "*.midjourney.com")


@dataclass(frozen=True, slots=True)
class S3Config:
    """An S3-compatible bucket that every replica shares (``images.store: s3``)."""

    endpoint_url: str = ""  # empty: AWS's own endpoint for ``region``
    bucket: str = ""
    region: str = "us-east-1"
    access_key: Secret = field(default_factory=lambda: Secret(""))
    secret_key: Secret = field(default_factory=lambda: Secret(""))
    prefix: str = "mjgate/images/"


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    """The image proxy (``/mj/image/{task_id}``).

    Images are fetched only from ``allowed_hosts`` (and each upstream's own host). An exact
    host there may resolve to a private address; one matched by a wildcard (``*`` or
    ``*.example.com``) must resolve to public addresses only.
    """

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = DEFAULT_IMAGE_HOSTS
    dir: str = "/var/cache/mjgate/images"
    max_disk_bytes: int = 10 * 1024**3
    max_bytes: int = 32 * 1024 * 1024  # one image, from its host
    timeout_s: float = 30.0  # one fetch from an image host, redirects included
    url_ttl_s: int = 86400  # signed URLs stay valid at least this long
    # Every signed-URL request spends from this one bucket: images cost the upstreams
    # nothing, so it only bounds a flood.
    signed_rate_limit: RateLimit = RateLimit(rps=500, burst=1000)
    rehost: bool = False  # keep every finished task's image when it is first seen
    rewrite: bool = False  # task answers carry mjgate's signed image URL
    store: Literal["disk", "s3"] = "disk"
    s3: S3Config = field(default_factory=S3Config)


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
    quota: QuotaConfig = QuotaConfig()
    submit: SubmitConfig = SubmitConfig()
    ledger: LedgerConfig = LedgerConfig()
    watcher: WatcherConfig = WatcherConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    images: ImagesConfig = field(default_factory=ImagesConfig)


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
