"""Reading the config file: YAML, ``${VAR}`` and ``${VAR:-default}`` interpolation, and
validation into the frozen types of ``gateway.config``.

Every problem found is reported at once, one line each, naming the YAML path:
``upstreams[1].auth: must be mj-api-secret or bearer``. Defaults live only in the dataclasses
of ``gateway.config``: a value the file leaves out (or gets wrong) is not passed on, so the
dataclass supplies its own.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
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
    CorsConfig,
    FanoutConfig,
    ImagesConfig,
    LedgerConfig,
    LoggingConfig,
    MetricsConfig,
    Quota,
    QuotaConfig,
    RateLimit,
    RateLimitConfig,
    RedisConfig,
    S3Config,
    Secret,
    ServerConfig,
    SubmitConfig,
    UpstreamConfig,
    WatcherConfig,
    WebhookConfig,
    WebhooksConfig,
    hash_key,
)
from gateway.weakkeys import is_weak_digest

__all__ = ["CLIENT_NAME", "config_from_dict", "load_config"]

UPSTREAM_NAME = re.compile(r"^[a-z0-9_-]+$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PASSTHROUGH_PATH = re.compile(r"^/mj[a-z-]*/[A-Za-z0-9/_.-]+$")
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
HOST = re.compile(r"^[A-Za-z0-9_.-]+$")
HOSTNAME = re.compile(r"^(?!.*\.\.)[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?$")
S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
S3_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()/-]{0,512}$")
LIST_PATHS = ("/mj/task/list-by-condition", "/mj/task/list-by-ids")
# One interpolation token: an escaped $, a well-formed ${VAR} or ${VAR:-default}, or the start
# of a malformed one (an unclosed ${, or $VAR without braces).
_TOKEN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{|\$[A-Za-z_]")
_UNCLOSED = "has an unclosed or malformed ${...}: write ${VAR} or ${VAR:-default}"
_UNBRACED = "has $NAME without braces, which is not interpolated: write ${NAME}, or $$ for a $"
# A signing key shorter than this can be found by trying.
_MIN_SECRET_KEY = 32

T = TypeVar("T")
Convert = Callable[[Any], Any]


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
    reader = _Reader(problems, reported=frozenset(p.split(":", 1)[0] for p in problems))
    config = reader.config(data)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return config


def _interpolate(node: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node
    where = path or "<root>"

    def substitute(match: re.Match[str]) -> str:
        token, name, default = match.group(0, 1, 2)
        if token == "$$":
            return "$"
        if name is None:
            problems.append(f"{where}: {_UNCLOSED if token == '${' else _UNBRACED}")
            return token
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            problems.append(f"{where}: environment variable {name} is not set")
        return ""

    return _TOKEN.sub(substitute, node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Problems(ValueError):
    """Problems below a value's path, as (suffix, message) pairs: ``("[2]", "must be ...")``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems[0][1])
        self.problems = problems


class _Reader:
    """Walks the document, converting values and recording problems with their paths."""

    def __init__(self, problems: list[str], reported: frozenset[str]) -> None:
        self.problems = problems
        # Paths whose ${VAR} could not be resolved: already reported, so not reported again
        # (as empty, say).
        self.reported = reported

    def fail(self, path: str, message: str) -> None:
        if any(p == path or p.startswith((f"{path}.", f"{path}[")) for p in self.reported):
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

    def read(
        self, node: Mapping[str, Any], path: str, key: str, convert: Callable[[Any], T]
    ) -> T | None:
        """``node[key]`` converted; None when it is absent or invalid (then reported)."""
        raw = node.get(key)
        if raw is None:
            return None
        where = _join(path, key)
        try:
            return convert(raw)
        except _Problems as exc:
            for suffix, message in exc.problems:
                self.fail(where + suffix, message)
        except (TypeError, ValueError) as exc:
            self.fail(where, str(exc))
        return None

    def fields(
        self, node: Mapping[str, Any], path: str, rules: Mapping[str, Convert]
    ) -> dict[str, Any]:
        """The values of ``rules`` that ``node`` sets validly, converted, for a dataclass."""
        values = {key: self.read(node, path, key, convert) for key, convert in rules.items()}
        return {key: value for key, value in values.items() if value is not None}

    def section(
        self, node: Any, path: str, cls: Callable[..., T], rules: Mapping[str, Convert]
    ) -> T:
        return cls(**self.fields(self.mapping(node, path, tuple(rules)), path, rules))

    def required(self, node: dict[str, Any], path: str, key: str) -> str:
        value = node.get(key)
        if value is None or value == "":
            self.fail(_join(path, key), "is required")
            return ""
        if not isinstance(value, str | int | float):
            self.fail(_join(path, key), "must be a string")
            return ""
        return str(value)

    def config(self, data: Any) -> Config:
        root = self.mapping(data, "", (*_SECTIONS, *_ROOT))
        upstreams = self.upstreams(root.get("upstreams"))
        config = Config(
            upstreams=upstreams,
            clients=self.clients(root.get("clients"), {u.name for u in upstreams}),
            server=self.server(root.get("server")),
            redis=self.redis(root.get("redis")),
            rate_limit=self.rate_limit(root.get("rate_limit")),
            cache=self.section(root.get("cache"), "cache", CacheConfig, _CACHE),
            fanout=self.section(root.get("fanout"), "fanout", FanoutConfig, _FANOUT),
            circuit=self.section(root.get("circuit"), "circuit", CircuitConfig, _CIRCUIT),
            metrics=self.section(root.get("metrics"), "metrics", MetricsConfig, _METRICS),
            logging=self.section(root.get("logging"), "logging", LoggingConfig, _LOGGING),
            quota=self.quota_config(root.get("quota")),
            submit=self.section(root.get("submit"), "submit", SubmitConfig, _SUBMIT),
            ledger=self.section(root.get("ledger"), "ledger", LedgerConfig, _LEDGER),
            images=self.images(root.get("images")),
            watcher=self.section(root.get("watcher"), "watcher", WatcherConfig, _WATCHER),
            webhooks=self.section(root.get("webhooks"), "webhooks", WebhooksConfig, _WEBHOOKS),
            **self.fields(root, "", _ROOT),
        )
        self.check_push(config)
        self.check_images(config)
        if not config.clients and not config.allow_anonymous:
            self.fail("clients", "no clients configured; add one or set allow_anonymous: true")
        return config

    def check_push(self, config: Config) -> None:
        """An upstream that pushes needs a URL of mjgate's to push to, signed."""
        server = config.server
        for index, upstream in enumerate(config.upstreams):
            if upstream.push and not (server.public_url and server.secret_key.reveal()):
                self.fail(
                    f"upstreams[{index}].push",
                    "needs server.public_url and server.secret_key (its hook URL is signed)",
                )
        webhooks = config.webhooks
        if webhooks.backoff_max_s < webhooks.backoff_s:
            self.fail("webhooks.backoff_max_s", "must be at least webhooks.backoff_s")

    def server(self, node: Any) -> ServerConfig:
        m = self.mapping(node, "server", (*_SERVER, "cors"))
        cors = self.section(m.get("cors"), "server.cors", CorsConfig, _CORS)
        if "*" in cors.allow_origins and len(cors.allow_origins) > 1:
            self.fail("server.cors.allow_origins", '"*" allows every origin: list it alone')
        return ServerConfig(cors=cors, **self.fields(m, "server", _SERVER))

    def redis(self, node: Any) -> RedisConfig:
        redis = self.section(node, "redis", RedisConfig, _REDIS)
        if redis.cluster and (redis.sentinels or not redis.url.reveal()):
            self.fail("redis.cluster", "needs redis.url (one cluster node) and no sentinels")
        return redis

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
        if all(u.weight == 0 for u in result):
            self.fail("upstreams", "every upstream has weight 0, so none takes new submits")
        return tuple(result)

    def upstream(self, node: Any, path: str) -> UpstreamConfig:
        m = self.mapping(node, path, ("name", "base_url", "key", *_UPSTREAM))
        name = self.required(m, path, "name")
        if name and not UPSTREAM_NAME.match(name):
            self.fail(f"{path}.name", "must match [a-z0-9_-]+")
        base_url = self.required(m, path, "base_url")
        if base_url and (message := _http_url(base_url, "; put the key in key:")):
            self.fail(f"{path}.base_url", message)
        return UpstreamConfig(
            name=name,
            base_url=base_url.rstrip("/"),
            key=Secret(self.required(m, path, "key")),
            **self.fields(m, path, _UPSTREAM),
        )

    def clients(self, node: Any, upstream_names: set[str]) -> tuple[ClientConfig, ...]:
        if node is None:
            return ()
        if not isinstance(node, list):
            self.fail("clients", "must be a list")
            return ()
        result: list[ClientConfig] = []
        holders: dict[str, tuple[str, str]] = {}  # digest -> (its path, its client's name)
        for index, item in enumerate(node):
            path = f"clients[{index}]"
            client, digests = self.client(item, path, upstream_names)
            if any(c.name == client.name for c in result):
                self.fail(f"{path}.name", f"duplicate client name {client.name!r}")
            for where, digest in digests:
                if digest not in holders:
                    holders[digest] = (where, client.name)
                    continue
                other, other_name = holders[digest]
                self.fail(
                    where,
                    f"client {client.name!r} has the same key as {other} (client {other_name!r})",
                )
            result.append(client)
        return tuple(result)

    def client(
        self, node: Any, path: str, upstream_names: set[str]
    ) -> tuple[ClientConfig, list[tuple[str, str]]]:
        """The client, and each of its key digests with the path it was given at."""
        m = self.mapping(node, path, _CLIENT_KEYS)
        name = self.required(m, path, "name")
        if name and not CLIENT_NAME.match(name):
            self.fail(f"{path}.name", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        digests = self.digests(m, path, name)
        first, *extra = [digest for _, digest in digests] or [""]
        client = ClientConfig(
            name=name,
            key_sha256=first,
            extra_key_sha256s=tuple(extra),
            rate_limit=self.limit(m.get("rate_limit"), f"{path}.rate_limit"),
            upstreams=self.allow_list(m.get("upstreams"), f"{path}.upstreams", upstream_names),
            quota=self.quota(m.get("quota"), f"{path}.quota"),
            webhook=self.section(m.get("webhook"), f"{path}.webhook", WebhookConfig, _WEBHOOK),
            **self.fields(m, path, _CLIENT),
        )
        if client.visibility == "team" and not m.get("team"):
            self.fail(f"{path}.visibility", "team needs the client's team: set team")
        return client, digests

    def digests(self, m: dict[str, Any], path: str, client: str) -> list[tuple[str, str]]:
        """Every valid key a client holds, as (path, digest): from ``key``, ``key_sha256`` and
        the lists ``keys`` and ``key_sha256s``, in any combination."""
        entries: list[tuple[str, Any, bool]] = [
            (f"{path}.{field}", m[field], field == "key_sha256")
            for field in ("key", "key_sha256")
            if m.get(field) not in (None, "")
        ]
        bad_list = False
        for field in ("keys", "key_sha256s"):
            raw = m.get(field)
            if raw is not None and not isinstance(raw, list):
                self.fail(f"{path}.{field}", "must be a list")
                bad_list = True
            elif raw is not None:
                is_digest = field == "key_sha256s"
                entries += [(f"{path}.{field}[{i}]", v, is_digest) for i, v in enumerate(raw)]
        if not entries and not bad_list:
            self.fail(path, "needs a key: key, keys, key_sha256 or key_sha256s")
        found = [
            (where, self.digest(raw, where, is_digest, client)) for where, raw, is_digest in entries
        ]
        return [(where, digest) for where, digest in found if digest]

    def digest(self, raw: Any, where: str, is_digest: bool, client: str) -> str | None:
        """The digest of one key entry; None when it is invalid or weak (then reported)."""
        if raw in (None, "") or not isinstance(raw, str | int | float):
            self.fail(where, "must be a non-empty string")
            return None
        digest = str(raw).lower() if is_digest else hash_key(str(raw))
        if not SHA256_HEX.match(digest):
            self.fail(where, "must be 64 hex digits (see: mjgate hash-key)")
        elif is_weak_digest(digest):
            what = "the digest of a well-known weak key" if is_digest else "a well-known weak key"
            self.fail(where, f"is {what} (client {client!r})")
        else:
            return digest
        return None

    def allow_list(self, node: Any, path: str, upstream_names: set[str]) -> tuple[str, ...] | None:
        if node is None:
            return None
        if not isinstance(node, list) or not all(isinstance(u, str) for u in node):
            self.fail(path, "must be a list of upstream names")
            return None
        for unknown in sorted(set(node) - upstream_names):
            self.fail(path, f"unknown upstream {unknown!r}")
        return tuple(dict.fromkeys(node))

    def limit(self, node: Any, path: str) -> RateLimit | None:
        if node is None:
            return None
        m = self.mapping(node, path, (*_BUCKET, "submit", "query"))
        main = Bucket(**self.fields(m, path, _BUCKET))
        classes = {
            name: self.section(m[name], f"{path}.{name}", Bucket, _BUCKET)
            for name in ("submit", "query")
            if m.get(name) is not None
        }
        return RateLimit(main.rps, main.burst, **classes)

    def quota(self, node: Any, path: str) -> Quota | None:
        return None if node is None else self.section(node, path, Quota, _QUOTA)

    def quota_config(self, node: Any) -> QuotaConfig:
        m = self.mapping(node, "quota", ("default",))
        default = self.quota(m.get("default"), "quota.default")
        return QuotaConfig() if default is None else QuotaConfig(default)

    def images(self, node: Any) -> ImagesConfig:
        m = self.mapping(node, "images", (*_IMAGES, "s3", "signed_rate_limit"))
        s3 = self.section(m.get("s3"), "images.s3", S3Config, _S3)
        images = ImagesConfig(s3=s3, **self.fields(m, "images", _IMAGES))
        signed = self.limit(m.get("signed_rate_limit"), "images.signed_rate_limit")
        return images if signed is None else dataclasses.replace(images, signed_rate_limit=signed)

    def check_images(self, config: Config) -> None:
        """What the image settings need from the rest of the config."""
        images, server = config.images, config.server
        if not images.enabled:
            for key in ("rehost", "rewrite"):
                if getattr(images, key):
                    self.fail(f"images.{key}", "needs images.enabled: true")
        if images.rewrite and not (server.public_url and server.secret_key.reveal()):
            self.fail("images.rewrite", "needs server.public_url and server.secret_key")
        if images.max_disk_bytes < images.max_bytes:
            self.fail("images.max_disk_bytes", "must be at least images.max_bytes")
        if images.store == "s3" and not images.s3.bucket:
            self.fail("images.s3.bucket", "is required with images.store: s3")

    def rate_limit(self, node: Any) -> RateLimitConfig:
        m = self.mapping(node, "rate_limit", ("default", *_RATE_LIMIT))
        values = self.fields(m, "rate_limit", _RATE_LIMIT)
        default = self.limit(m.get("default"), "rate_limit.default")
        if default is not None:
            values["default"] = default
        return RateLimitConfig(**values)


def _checked(convert: Callable[[Any], T], check: Callable[[T], str | None]) -> Callable[[Any], T]:
    """``convert``, then ``check``: a message from the check is the value's problem."""

    def run(raw: Any) -> T:
        value = convert(raw)
        message = check(value)
        if message:
            raise ValueError(message)
        return value

    return run


def _secret(check: Callable[[str], str | None] = lambda _: None) -> Callable[[Any], Secret]:
    convert = _checked(str, check)
    return lambda raw: Secret(convert(raw))


def _list_of(item: Callable[[Any], T], what: str) -> Callable[[Any], tuple[T, ...]]:
    """A list whose every item passes ``item``; problems are reported per item."""

    def convert(raw: Any) -> tuple[T, ...]:
        if not isinstance(raw, list):
            raise ValueError(f"must be a list of {what}")
        values: list[T] = []
        problems: list[tuple[str, str]] = []
        for index, value in enumerate(raw):
            try:
                values.append(item(value))
            except ValueError as exc:
                problems.append((f"[{index}]", str(exc)))
        if problems:
            raise _Problems(problems)
        return tuple(values)

    return convert


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


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
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


def _http_url(value: str, credentials_hint: str = "") -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return f"must not hold credentials{credentials_hint}"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _public_url(value: Any) -> str:
    text = str(value)
    message = _http_url(text) if text else None
    if message:
        raise ValueError(message)
    return text.rstrip("/")


def _origin(value: Any) -> str:
    """``*`` or a browser origin, in the lower case browsers send it in."""
    text = str(value)
    if text == "*":
        return text
    parts = urlsplit(text)
    if _http_url(text) or parts.path:
        raise ValueError('must be "*" or an origin like https://app.example.com (no path)')
    return text.lower()


def _webhook_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return "must not hold credentials" if parts.username or parts.password else None


def _webhook_secret(value: str) -> str | None:
    """A Standard Webhooks secret: ``whsec_`` and 24 to 64 random bytes in base64."""
    if not value:
        return None
    hint = "(try: echo whsec_$(openssl rand -base64 32))"
    try:
        size = len(base64.b64decode(value.removeprefix("whsec_"), validate=True))
    except binascii.Error:
        size = 0
    if not value.startswith("whsec_") or not 24 <= size <= 64:
        return f"must be whsec_ and 24 to 64 bytes in base64 {hint}"
    return None


def _destination(value: Any) -> str:
    """A webhook destination, normalized: ``host``, ``host:port`` or a CIDR (an address
    alone is a one-address CIDR); IPv6 with a port as ``[addr]:port``."""
    text = str(value).strip().lower()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    host, colon, port = text.rpartition(":")
    if not colon or "]" in port:
        host, port = text, ""
    elif not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("must be a host, host:port or CIDR (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("must be a host, host:port or CIDR") from None
        return f"[{address}]:{port}" if port else str(address)
    if not HOST.match(host):
        raise ValueError("must be a host, host:port or CIDR")
    return f"{host}:{port}" if port else host


def _redis_url(value: str) -> str | None:
    if not value:
        return None
    scheme = urlsplit(value).scheme
    ok = ("redis", "rediss", "unix")
    return None if scheme in ok else "must be a redis://, rediss:// or unix:// URL, or empty"


def _sentinel(value: Any) -> tuple[str, int]:
    text = str(value)
    if "@" in text:
        # Never echo the entry: it holds a password.
        raise ValueError("must be host:port, without credentials (a password goes in redis.url)")
    host, _, port = text.rpartition(":")
    if not HOST.match(host) or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError("must be host:port")
    return host, int(port)


def _passthrough_path(value: Any) -> str:
    if not isinstance(value, str) or not PASSTHROUGH_PATH.match(value):
        raise ValueError("must be a path under /mj, like /mj/account/list")
    return value


def _image_host(value: Any) -> str:
    """A host images may come from: a name, an IP address, ``*`` or ``*.example.com``."""
    text = str(value).strip().lower()
    if text == "*" or _is_ip(text) or HOSTNAME.match(text.removeprefix("*.")):
        return text
    raise ValueError('must be a host name or address, "*" or "*.example.com" (no port)')


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _signing_key(value: str) -> str | None:
    if not value or len(value) >= _MIN_SECRET_KEY:
        return None
    return f"must be at least {_MIN_SECRET_KEY} characters (try: openssl rand -hex 32)"


# What each section accepts and how each value is converted and checked. The defaults are the
# dataclasses' own.
_SECTIONS = (
    "server",
    "redis",
    "upstreams",
    "clients",
    "rate_limit",
    "cache",
    "fanout",
    "circuit",
    "metrics",
    "logging",
    "quota",
    "submit",
    "ledger",
    "images",
    "watcher",
    "webhooks",
)
_ROOT: dict[str, Convert] = {
    "allow_anonymous": _to_bool,
    "passthrough": _list_of(_passthrough_path, "paths"),
}
_SERVER: dict[str, Convert] = {
    "host": str,
    "port": _checked(_to_int, _between(1, 65535)),
    "max_body_bytes": _checked(_to_int, _at_least(1)),
    "max_header_bytes": _checked(_to_int, _at_least(1024)),
    "header_timeout_s": _checked(_to_float, _positive),
    "body_timeout_s": _checked(_to_float, _positive),
    "secret_key": _secret(_signing_key),
    "public_url": _public_url,
}
_CORS: dict[str, Convert] = {"allow_origins": _list_of(_origin, "origins")}
_REDIS: dict[str, Convert] = {
    "url": _secret(_redis_url),
    "key_prefix": _checked(str, _matches(KEY_PREFIX)),
    "socket_timeout_s": _checked(_to_float, _positive),
    "max_connections": _checked(_to_int, _at_least(1)),
    "pool_timeout_s": _checked(_to_float, _positive),
    "cluster": _to_bool,
    "sentinels": _list_of(_sentinel, "host:port entries"),
    "service_name": str,
}
_UPSTREAM: dict[str, Convert] = {
    "auth": _checked(str, _one_of("mj-api-secret", "bearer")),
    "list_by_ids_path": _checked(str, _one_of(*LIST_PATHS)),
    "supports_query": _to_bool,
    "weight": _checked(_to_float, _at_least(0)),
    "timeout_s": _checked(_to_float, _positive),
    "max_rps": _checked(_to_float, _positive),
    "max_concurrency": _checked(_to_int, _at_least(1)),
    "queue_timeout_s": _checked(_to_float, _at_least(0)),
    "max_response_bytes": _checked(_to_int, _at_least(1)),
    "push": _to_bool,
}
_CLIENT: dict[str, Convert] = {
    "admin": _to_bool,
    "team": _checked(str, _matches(CLIENT_NAME)),
    "visibility": _checked(_lower, _one_of("all", "team", "own")),
}
_CLIENT_KEYS = (
    "name",
    "key",
    "keys",
    "key_sha256",
    "key_sha256s",
    "rate_limit",
    "upstreams",
    "quota",
    "webhook",
    *_CLIENT,
)
_QUOTA: dict[str, Convert] = {
    "submits_per_day": _checked(_to_int, _at_least(0)),
    "submits_per_month": _checked(_to_int, _at_least(0)),
    "refund_failed": _to_bool,
}
_SUBMIT: dict[str, Convert] = {"dedup_window_s": _checked(_to_float, _at_least(0))}
_WATCHER: dict[str, Convert] = {
    "enabled": _to_bool,
    "interval_s": _checked(_to_float, _positive),
    "queued_interval_s": _checked(_to_float, _positive),
}
_WEBHOOKS: dict[str, Convert] = {
    "allow": _list_of(_destination, "hosts, host:port entries or CIDRs"),
    "max_attempts": _checked(_to_int, _at_least(1)),
    "backoff_s": _checked(_to_float, _positive),
    "backoff_max_s": _checked(_to_float, _positive),
    "timeout_s": _checked(_to_float, _positive),
}
_WEBHOOK: dict[str, Convert] = {
    "url": _checked(str, _webhook_url),
    "secret": _secret(_webhook_secret),
}
_LEDGER: dict[str, Convert] = {
    "retention_days": _checked(_to_float, _positive),
    "stuck_after_s": _checked(_to_float, _positive),
}
_IMAGES: dict[str, Convert] = {
    "enabled": _to_bool,
    "allowed_hosts": _list_of(_image_host, "hosts"),
    "dir": _checked(str, lambda value: None if value else "must not be empty"),
    "max_disk_bytes": _checked(_to_int, _at_least(1)),
    "max_bytes": _checked(_to_int, _at_least(1)),
    "timeout_s": _checked(_to_float, _positive),
    "url_ttl_s": _checked(_to_int, _at_least(60)),
    "rehost": _to_bool,
    "rewrite": _to_bool,
    "store": _checked(_lower, _one_of("disk", "s3")),
}
_S3: dict[str, Convert] = {
    "endpoint_url": _checked(str, lambda value: _http_url(value) if value else None),
    "bucket": _checked(str, lambda value: _matches(S3_BUCKET)(value) if value else None),
    "region": str,
    "access_key": _secret(),
    "secret_key": _secret(),
    "prefix": _checked(str, _matches(S3_PREFIX)),
}
_BUCKET: dict[str, Convert] = {
    "rps": _checked(_to_float, _positive),
    "burst": _checked(_to_int, _at_least(1)),
}
_RATE_LIMIT: dict[str, Convert] = {"on_store_error": _checked(str, _one_of("allow", "deny"))}
_CACHE: dict[str, Convert] = {
    f.name: _checked(_to_int, _at_least(0)) for f in dataclasses.fields(CacheConfig)
}
_FANOUT: dict[str, Convert] = {
    "max_ids": _checked(_to_int, _at_least(1)),
    "deadline_s": _checked(_to_float, _positive),
    "batch_size": _checked(_to_int, _at_least(1)),
}
_CIRCUIT: dict[str, Convert] = {
    "failure_threshold": _checked(_to_int, _at_least(1)),
    "cooldown_s": _checked(_to_float, _positive),
}
_METRICS: dict[str, Convert] = {
    "enabled": _to_bool,
    "path": _checked(str, _path_check),
    "token": _secret(),
}
_LOGGING: dict[str, Convert] = {
    "level": _checked(_lower, _one_of("debug", "info", "warning", "error")),
    "format": _checked(_lower, _one_of("json", "console")),
}
