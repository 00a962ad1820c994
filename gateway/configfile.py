"""Reading the config file: YAML, ``${VAR}`` and ``${VAR:-default}`` interpolation, and
validation into the frozen types of ``gateway.config``.

Every problem found is reported at once, one line each, naming the YAML path:
``upstreams[1].auth: must be mj-api-secret or bearer``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway.config import (
    Bucket,
    CacheConfig,
    CircuitConfig,
    ClientConfig,
    Config,
    ConfigError,
    FanoutConfig,
    LoggingConfig,
    MetricsConfig,
    RateLimit,
    RateLimitConfig,
    RedisConfig,
    Secret,
    ServerConfig,
    UpstreamConfig,
    hash_key,
)

__all__ = ["CLIENT_NAME", "config_from_dict", "load_config"]

UPSTREAM_NAME = re.compile(r"^[a-z0-9_-]+$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PASSTHROUGH_PATH = re.compile(r"^/mj[a-z-]*/[A-Za-z0-9/_.-]+$")
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
LIST_PATHS = ("/mj/task/list-by-condition", "/mj/task/list-by-ids")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a YAML config file; raise ConfigError on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Never quote the offending line: it may hold a key.
        where, what = "", "not valid YAML"
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = f"not valid YAML: {exc.problem or exc.context}"
        raise ConfigError([f"{path}:{where}: {what}"]) from None
    return config_from_dict(data if data is not None else {}, env)


def config_from_dict(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed config document (``${VAR}`` still allowed in strings)."""
    problems: list[str] = []
    data = _interpolate(data, "", os.environ if env is None else env, problems)
    reader = _Reader(problems, unset=frozenset(p.split(":", 1)[0] for p in problems))
    config = reader.config(data)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def _interpolate(node: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
        return ""

    return _VAR.sub(substitute, node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


T = TypeVar("T")


class _Reader:
    """Walks the document, converting values and recording problems with their paths."""

    def __init__(self, problems: list[str], unset: frozenset[str]) -> None:
        self.problems = problems
        # Paths whose ${VAR} was unset: already reported, so not reported again as empty.
        self.unset = unset

    def fail(self, path: str, message: str) -> None:
        if any(p == path or p.startswith((f"{path}.", f"{path}[")) for p in self.unset):
            return
        self.problems.append(f"{path}: {message}")

    def mapping(self, node: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.fail(path or "<root>", "must be a mapping")
            return {}
        for key in node:
            if key not in allowed:
                self.fail(
                    _join(path, str(key)), f"unknown key (expected one of: {', '.join(allowed)})"
                )
        return node

    def value(
        self,
        node: dict[str, Any],
        path: str,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        check: Callable[[T], str | None] | None = None,
    ) -> T:
        if key not in node or node[key] is None:
            return default
        where = _join(path, key)
        try:
            result = convert(node[key])
        except (TypeError, ValueError) as exc:
            self.fail(where, str(exc))
            return default
        message = check(result) if check else None
        if message:
            self.fail(where, message)
            return default
        return result

    def required(self, node: dict[str, Any], path: str, key: str) -> str:
        value = node.get(key)
        if value is None or value == "":
            self.fail(_join(path, key), "is required")
            return ""
        if not isinstance(value, str | int | float):
            self.fail(_join(path, key), "must be a string")
            return ""
        return str(value)

    def config(self, data: Any) -> Config | None:
        root = self.mapping(data, "", _ROOT_KEYS)
        upstreams = self.upstreams(root.get("upstreams"))
        names = {u.name for u in upstreams}
        clients = self.clients(root.get("clients"), names)
        allow_anonymous = self.value(root, "", "allow_anonymous", _to_bool, False)
        if not clients and not allow_anonymous:
            self.fail("clients", "no clients configured; add one or set allow_anonymous: true")
        return Config(
            upstreams=upstreams,
            clients=clients,
            allow_anonymous=allow_anonymous,
            server=self.server(root.get("server")),
            redis=self.redis(root.get("redis")),
            rate_limit=self.rate_limit_section(root.get("rate_limit")),
            cache=self.cache(root.get("cache")),
            fanout=self.fanout(root.get("fanout")),
            passthrough=self.passthrough(root.get("passthrough")),
            circuit=self.circuit(root.get("circuit")),
            metrics=self.metrics(root.get("metrics")),
            logging=self.logging(root.get("logging")),
        )

    def server(self, node: Any) -> ServerConfig:
        m = self.mapping(node, "server", ("host", "port", "max_body_bytes"))
        return ServerConfig(
            host=self.value(m, "server", "host", str, "0.0.0.0"),
            port=self.value(m, "server", "port", _to_int, 8080, _between(1, 65535)),
            max_body_bytes=self.value(
                m, "server", "max_body_bytes", _to_int, 10 * 1024 * 1024, _at_least(1)
            ),
        )

    def redis(self, node: Any) -> RedisConfig:
        m = self.mapping(node, "redis", tuple(RedisConfig.__dataclass_fields__))
        url = self.value(m, "redis", "url", str, "", _redis_url)
        cluster = self.value(m, "redis", "cluster", _to_bool, False)
        sentinels = self.sentinels(m.get("sentinels"))
        if cluster and (sentinels or not url):
            self.fail("redis.cluster", "needs redis.url (one cluster node) and no sentinels")
        return RedisConfig(
            cluster=cluster,
            sentinels=sentinels,
            service_name=self.value(m, "redis", "service_name", str, "mymaster"),
            url=Secret(url),
            key_prefix=self.value(m, "redis", "key_prefix", str, "mjgate", _matches(KEY_PREFIX)),
            socket_timeout_s=self.value(m, "redis", "socket_timeout_s", _to_float, 0.25, _positive),
            max_connections=self.value(m, "redis", "max_connections", _to_int, 64, _at_least(1)),
            pool_timeout_s=self.value(m, "redis", "pool_timeout_s", _to_float, 0.5, _positive),
        )

    def sentinels(self, node: Any) -> tuple[tuple[str, int], ...]:
        if node is None:
            return ()
        if not isinstance(node, list):
            self.fail("redis.sentinels", "must be a list of host:port entries")
            return ()
        result: list[tuple[str, int]] = []
        for index, item in enumerate(node):
            host, _, port = str(item).rpartition(":")
            if not host or not port.isdigit():
                self.fail(f"redis.sentinels[{index}]", "must be host:port")
                continue
            result.append((host, int(port)))
        return tuple(result)

    def upstreams(self, node: Any) -> tuple[UpstreamConfig, ...]:
        if not isinstance(node, list) or not node:
            self.fail("upstreams", "must be a non-empty list")
            return ()
        result: list[UpstreamConfig] = []
        for index, item in enumerate(node):
            upstream = self.upstream(item, f"upstreams[{index}]")
            if any(u.name == upstream.name for u in result):
                self.fail(f"upstreams[{index}].name", f"duplicate upstream name {upstream.name!r}")
            result.append(upstream)
        return tuple(result)

    def upstream(self, node: Any, path: str) -> UpstreamConfig:
        m = self.mapping(node, path, _UPSTREAM_KEYS)
        name = self.required(m, path, "name")
        if name and not UPSTREAM_NAME.match(name):
            self.fail(f"{path}.name", "must match [a-z0-9_-]+")
        base_url = self.required(m, path, "base_url")
        if base_url and (message := _http_url(base_url)):
            self.fail(f"{path}.base_url", message)
        auth = self.value(m, path, "auth", str, "mj-api-secret", _one_of("mj-api-secret", "bearer"))
        return UpstreamConfig(
            name=name,
            base_url=base_url.rstrip("/"),
            auth="bearer" if auth == "bearer" else "mj-api-secret",
            key=Secret(self.required(m, path, "key")),
            list_by_ids_path=self.value(
                m, path, "list_by_ids_path", str, LIST_PATHS[0], _one_of(*LIST_PATHS)
            ),
            supports_query=self.value(m, path, "supports_query", _to_bool, False),
            weight=self.value(m, path, "weight", _to_float, 1.0, _at_least(0)),
            timeout_s=self.value(m, path, "timeout_s", _to_float, 15.0, _positive),
            max_rps=self.value(m, path, "max_rps", _to_float, 20.0, _positive),
            max_concurrency=self.value(m, path, "max_concurrency", _to_int, 32, _at_least(1)),
            queue_timeout_s=self.value(m, path, "queue_timeout_s", _to_float, 2.0, _at_least(0)),
        )

    def clients(self, node: Any, upstream_names: set[str]) -> tuple[ClientConfig, ...]:
        if node is None:
            return ()
        if not isinstance(node, list):
            self.fail("clients", "must be a list")
            return ()
        result: list[ClientConfig] = []
        for index, item in enumerate(node):
            path = f"clients[{index}]"
            client = self.client(item, path, upstream_names)
            if any(c.name == client.name for c in result):
                self.fail(f"{path}.name", f"duplicate client name {client.name!r}")
            if client.key_sha256 and any(c.key_sha256 == client.key_sha256 for c in result):
                self.fail(path, "uses the same key as another client")
            result.append(client)
        return tuple(result)

    def client(self, node: Any, path: str, upstream_names: set[str]) -> ClientConfig:
        keys = ("name", "key", "key_sha256", "rate_limit", "upstreams", "admin")
        m = self.mapping(node, path, keys)
        name = self.required(m, path, "name")
        if name and not CLIENT_NAME.match(name):
            self.fail(f"{path}.name", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        digest = self.client_digest(m, path)
        allowed: tuple[str, ...] | None = None
        if m.get("upstreams") is not None:
            raw = m["upstreams"]
            if not isinstance(raw, list) or not all(isinstance(u, str) for u in raw):
                self.fail(f"{path}.upstreams", "must be a list of upstream names")
            else:
                for unknown in sorted(set(raw) - upstream_names):
                    self.fail(f"{path}.upstreams", f"unknown upstream {unknown!r}")
                allowed = tuple(dict.fromkeys(raw))
        limit = None
        if m.get("rate_limit") is not None:
            limit = self.limit(m["rate_limit"], f"{path}.rate_limit")
        admin = self.value(m, path, "admin", _to_bool, False)
        return ClientConfig(name, digest, rate_limit=limit, upstreams=allowed, admin=admin)

    def client_digest(self, m: dict[str, Any], path: str) -> str:
        key, digest = m.get("key"), m.get("key_sha256")
        if key and digest:
            self.fail(path, "set key or key_sha256, not both")
        elif key:
            return hash_key(str(key))
        elif digest:
            digest = str(digest).lower()
            if SHA256_HEX.match(digest):
                return digest
            self.fail(f"{path}.key_sha256", "must be 64 hex digits (see: mjgate hash-key)")
        else:
            self.fail(path, "needs key or key_sha256")
        return ""

    def limit(self, node: Any, path: str) -> RateLimit:
        m = self.mapping(node, path, ("rps", "burst", "submit", "query"))
        classes = {
            name: self.bucket(m[name], f"{path}.{name}")
            for name in ("submit", "query")
            if m.get(name) is not None
        }
        main = self.bucket({k: v for k, v in m.items() if k in ("rps", "burst")}, path)
        return RateLimit(main.rps, main.burst, **classes)

    def bucket(self, node: Any, path: str) -> Bucket:
        m = self.mapping(node, path, ("rps", "burst"))
        return Bucket(
            rps=self.value(m, path, "rps", _to_float, 10.0, _positive),
            burst=self.value(m, path, "burst", _to_int, 20, _at_least(1)),
        )

    def rate_limit_section(self, node: Any) -> RateLimitConfig:
        m = self.mapping(node, "rate_limit", ("default", "on_store_error"))
        default = RateLimit(rps=10.0, burst=20)
        if m.get("default") is not None:
            default = self.limit(m["default"], "rate_limit.default")
        on_error = self.value(
            m, "rate_limit", "on_store_error", str, "allow", _one_of("allow", "deny")
        )
        return RateLimitConfig(
            default=default, on_store_error="deny" if on_error == "deny" else "allow"
        )

    def cache(self, node: Any) -> CacheConfig:
        path, defaults = "cache", CacheConfig()
        m = self.mapping(node, path, tuple(CacheConfig.__dataclass_fields__))
        values = {
            name: self.value(m, path, name, _to_int, getattr(defaults, name), _at_least(0))
            for name in CacheConfig.__dataclass_fields__
        }
        return CacheConfig(**values)

    def fanout(self, node: Any) -> FanoutConfig:
        m = self.mapping(node, "fanout", ("max_ids", "deadline_s", "batch_size"))
        return FanoutConfig(
            max_ids=self.value(m, "fanout", "max_ids", _to_int, 500, _at_least(1)),
            deadline_s=self.value(m, "fanout", "deadline_s", _to_float, 10.0, _positive),
            batch_size=self.value(m, "fanout", "batch_size", _to_int, 100, _at_least(1)),
        )

    def passthrough(self, node: Any) -> tuple[str, ...]:
        if node is None:
            return ()
        if not isinstance(node, list):
            self.fail("passthrough", "must be a list of paths")
            return ()
        for index, item in enumerate(node):
            if not isinstance(item, str) or not PASSTHROUGH_PATH.match(item):
                self.fail(
                    f"passthrough[{index}]", "must be a path under /mj, like /mj/account/list"
                )
        return tuple(p for p in node if isinstance(p, str))

    def circuit(self, node: Any) -> CircuitConfig:
        m = self.mapping(node, "circuit", ("failure_threshold", "cooldown_s"))
        return CircuitConfig(
            failure_threshold=self.value(
                m, "circuit", "failure_threshold", _to_int, 5, _at_least(1)
            ),
            cooldown_s=self.value(m, "circuit", "cooldown_s", _to_float, 30.0, _positive),
        )

    def metrics(self, node: Any) -> MetricsConfig:
        m = self.mapping(node, "metrics", ("enabled", "path", "token"))
        return MetricsConfig(
            enabled=self.value(m, "metrics", "enabled", _to_bool, True),
            path=self.value(m, "metrics", "path", str, "/metrics", _path_check),
            token=Secret(self.value(m, "metrics", "token", str, "")),
        )

    def logging(self, node: Any) -> LoggingConfig:
        m = self.mapping(node, "logging", ("level", "format"))
        levels = ("debug", "info", "warning", "error")
        level = self.value(m, "logging", "level", _lower, "info", _one_of(*levels))
        fmt = self.value(m, "logging", "format", _lower, "json", _one_of("json", "console"))
        return LoggingConfig(level=level, format=fmt)  # type: ignore[arg-type]


_ROOT_KEYS = (
    "server",
    "redis",
    "upstreams",
    "clients",
    "allow_anonymous",
    "rate_limit",
    "cache",
    "fanout",
    "passthrough",
    "circuit",
    "metrics",
    "logging",
)
_UPSTREAM_KEYS = tuple(UpstreamConfig.__dataclass_fields__)


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be an integer, got {value!r}") from None


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, got {value!r}") from None


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "true",
        "yes",
        "on",
        "1",
        "false",
        "no",
        "off",
        "0",
    ):
        return value.lower() in ("true", "yes", "on", "1")
    raise ValueError(f"must be true or false, got {value!r}")


def _lower(value: Any) -> str:
    return str(value).lower()


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least(minimum: float) -> Callable[[float], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum}"


def _between(low: int, high: int) -> Callable[[int], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _one_of(*choices: str) -> Callable[[str], str | None]:
    expected = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
    return lambda value: None if value in choices else f"must be {expected}"


def _matches(pattern: re.Pattern[str]) -> Callable[[str], str | None]:
    return lambda value: None if pattern.match(value) else f"must match {pattern.pattern}"


def _path_check(value: str) -> str | None:
    return None if value.startswith("/") and " " not in value else "must be a path starting with /"


def _http_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "must not hold credentials; put the key in key:"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _redis_url(value: str) -> str | None:
    if not value:
        return None
    scheme = urlsplit(value).scheme
    ok = ("redis", "rediss", "unix")
    return None if scheme in ok else "must be a redis://, rediss:// or unix:// URL, or empty"
