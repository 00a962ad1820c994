"""Config contract (DESIGN.md section 4): YAML, ``${VAR}`` interpolation, frozen typed objects,
one line per problem naming its YAML path, and secrets that never show themselves."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    CacheConfig,
    CircuitConfig,
    Config,
    ConfigError,
    CorsConfig,
    FanoutConfig,
    LedgerConfig,
    LoggingConfig,
    MetricsConfig,
    Quota,
    QuotaConfig,
    RateLimitConfig,
    RedisConfig,
    Secret,
    ServerConfig,
    SubmitConfig,
    UpstreamConfig,
    WatcherConfig,
    WebhookConfig,
    WebhooksConfig,
    hash_key,
    redacted,
)
from gateway.configfile import config_from_dict, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
EXAMPLE_ENV = {
    "MAIN_MJ_KEY": "main-upstream-secret-4711",
    "RELAY_MJ_KEY": "relay-upstream-secret-0815",
    "ALICE_KEY": "alice-caller-secret-1234",
}
UPSTREAM_KEY = "upstream-secret-abcdef"
CALLER_KEY = "caller-secret-987654"
OTHER_KEY = "caller-secret-second-24680"
# The example's placeholders: digests no key is known to hash to.
DASHBOARDS_PLACEHOLDER = "0" * 63 + "1"
OPS_PLACEHOLDER = "0" * 63 + "2"


def upstream(**overrides: Any) -> dict[str, Any]:
    return {"name": "main", "base_url": "http://mj.example.com", "key": UPSTREAM_KEY, **overrides}


def document(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstreams": [upstream()],
        "clients": [{"name": "alice", "key": CALLER_KEY}],
    }
    data.update(sections)
    return data


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data, env=env or {})
    problems: list[str] = caught.value.problems
    assert str(caught.value) == "\n".join(problems)
    return problems


def only_problem(data: Any, env: dict[str, str] | None = None) -> str:
    problems = problems_of(data, env)
    assert len(problems) == 1, problems
    return problems[0]


# --- the reference file ---------------------------------------------------------------------


def test_example_config_loads_as_is_with_its_env_vars() -> None:
    config = load_config(EXAMPLE, env=EXAMPLE_ENV)

    main, relay = config.upstreams
    assert (main.name, main.auth, main.base_url) == (
        "main",
        "mj-api-secret",
        "https://mj.example.com",
    )
    assert main.key.reveal() == EXAMPLE_ENV["MAIN_MJ_KEY"]
    assert main.list_by_ids_path == "/mj/task/list-by-condition"
    assert main.supports_query is False
    assert (main.weight, main.timeout_s, main.max_rps, main.max_concurrency) == (1, 15, 20, 32)
    assert (relay.name, relay.auth, relay.weight) == ("relay", "bearer", 2)
    assert relay.key.reveal() == EXAMPLE_ENV["RELAY_MJ_KEY"]
    assert relay.list_by_ids_path == "/mj/task/list-by-ids"

    alice, dashboards, ops = config.clients
    assert alice.name == "alice"
    assert alice.key_sha256 == hash_key(EXAMPLE_ENV["ALICE_KEY"])
    assert alice.upstreams == ("main",)
    assert alice.rate_limit is not None
    assert (alice.rate_limit.rps, alice.rate_limit.burst) == (10, 20)
    assert alice.rate_limit.submit is not None
    assert (alice.rate_limit.submit.rps, alice.rate_limit.submit.burst) == (2, 5)
    assert alice.rate_limit.for_class("submit") == ("submit", alice.rate_limit.submit)
    assert alice.rate_limit.for_class("query")[0] == "all"
    assert dashboards.key_sha256s == (DASHBOARDS_PLACEHOLDER,)
    assert dashboards.upstreams is None
    assert not dashboards.admin and ops.admin
    assert (alice.team, alice.visibility, dashboards.visibility) == ("design", "team", "all")
    assert alice.quota == Quota(200, 3000, refund_failed=True)
    assert config.quota == QuotaConfig() and dashboards.quota is None
    assert (config.submit.dedup_window_s, config.ledger.retention_days) == (10, 30)
    assert ops.key_sha256s == (OPS_PLACEHOLDER,)

    assert config.allow_anonymous is False
    assert config.redis.url.reveal() == ""  # ${REDIS_URL:-} unset: the embedded store
    assert config.redis.key_prefix == "mjgate"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    assert (config.server.max_header_bytes, config.server.header_timeout_s) == (16384, 10)
    assert config.server.body_timeout_s == 30
    assert config.server.cors.allow_origins == ()
    assert config.server.secret_key.reveal() == ""  # ${MJGATE_SECRET_KEY:-} unset
    assert config.server.public_url == ""
    assert main.max_response_bytes == relay.max_response_bytes == 8 * 1024 * 1024
    assert config.rate_limit.on_store_error == "allow"
    assert config.cache.terminal_ttl_s == 604800
    assert config.cache.not_found_ttl_ms == 2000
    assert (config.fanout.max_ids, config.fanout.deadline_s) == (500, 10)
    assert config.passthrough == ()
    assert (config.metrics.enabled, config.metrics.path) == (True, "/metrics")
    assert (config.logging.level, config.logging.format) == ("info", "json")


def test_example_config_without_its_env_vars_names_each_missing_variable_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE, env={})
    assert sorted(caught.value.problems) == [
        "clients[0].key: environment variable ALICE_KEY is not set",
        "upstreams[0].key: environment variable MAIN_MJ_KEY is not set",
        "upstreams[1].key: environment variable RELAY_MJ_KEY is not set",
    ]


def test_example_config_takes_redis_url_from_the_environment() -> None:
    url = "redis://127.0.0.1:6390/2"
    config = load_config(EXAMPLE, env={**EXAMPLE_ENV, "REDIS_URL": url})
    assert config.redis.url.reveal() == url


# --- ${VAR} interpolation ---------------------------------------------------------------------


def test_var_is_replaced_by_its_value_inside_a_longer_string() -> None:
    data = document(upstreams=[upstream(base_url="http://${HOST}:${PORT}/v1")])
    config = config_from_dict(data, env={"HOST": "mj.internal", "PORT": "8443"})
    assert config.upstreams[0].base_url == "http://mj.internal:8443/v1"


@pytest.mark.parametrize("env", [{}, {"PREFIX": ""}], ids=["unset", "empty"])
def test_default_is_used_when_the_var_is_unset_or_empty(env: dict[str, str]) -> None:
    config = config_from_dict(document(redis={"key_prefix": "${PREFIX:-team-a}"}), env=env)
    assert config.redis.key_prefix == "team-a"


def test_set_var_wins_over_its_default() -> None:
    config = config_from_dict(
        document(redis={"key_prefix": "${PREFIX:-team-a}"}), env={"PREFIX": "team-b"}
    )
    assert config.redis.key_prefix == "team-b"


def test_empty_default_gives_an_empty_string() -> None:
    config = config_from_dict(document(redis={"url": "${REDIS_URL:-}"}), env={})
    assert config.redis.url.reveal() == ""


def test_unset_var_without_default_is_one_line_naming_the_yaml_path() -> None:
    data = document(upstreams=[upstream(), upstream(name="relay", key="${RELAY_KEY}")])
    assert only_problem(data) == "upstreams[1].key: environment variable RELAY_KEY is not set"


def test_unset_client_key_is_not_reported_again_as_a_missing_key() -> None:
    data = document(clients=[{"name": "alice", "key": "${ALICE_KEY}"}])
    assert only_problem(data) == "clients[0].key: environment variable ALICE_KEY is not set"


def test_unset_var_inside_a_list_is_not_reported_again_as_an_unknown_upstream() -> None:
    data = document(clients=[{"name": "alice", "key": CALLER_KEY, "upstreams": ["${UP}"]}])
    assert only_problem(data) == "clients[0].upstreams[0]: environment variable UP is not set"


def test_environment_of_the_process_is_used_when_env_is_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MJGATE_TEST_PREFIX", "from-process-env")
    config = config_from_dict(document(redis={"key_prefix": "${MJGATE_TEST_PREFIX}"}))
    assert config.redis.key_prefix == "from-process-env"


def test_numbers_and_bools_may_come_from_env_strings() -> None:
    data = document(
        server={"port": "${PORT}", "max_body_bytes": "${MAX_BODY:-2048}"},
        upstreams=[
            upstream(
                weight="${WEIGHT}",
                supports_query="${SUPPORTS_QUERY}",
                timeout_s="${TIMEOUT:-7.5}",
                max_concurrency="${CONCURRENCY}",
            )
        ],
        allow_anonymous="${ANONYMOUS}",
        metrics={"enabled": "${METRICS:-off}"},
    )
    env = {
        "PORT": "9001",
        "WEIGHT": "2.5",
        "SUPPORTS_QUERY": "yes",
        "CONCURRENCY": "8",
        "ANONYMOUS": "true",
    }
    config = config_from_dict(data, env=env)
    assert config.server.port == 9001
    assert config.server.max_body_bytes == 2048
    assert config.upstreams[0].weight == 2.5
    assert config.upstreams[0].supports_query is True
    assert config.upstreams[0].timeout_s == 7.5
    assert config.upstreams[0].max_concurrency == 8
    assert config.allow_anonymous is True
    assert config.metrics.enabled is False


def test_number_from_env_that_is_not_a_number_names_its_path() -> None:
    problem = only_problem(document(server={"port": "${PORT}"}), env={"PORT": "eighty"})
    assert problem.startswith("server.port: ")
    assert "integer" in problem


def test_bool_from_env_that_is_not_a_bool_names_its_path() -> None:
    data = document(upstreams=[upstream(supports_query="${Q}")])
    problem = only_problem(data, env={"Q": "maybe"})
    assert problem.startswith("upstreams[0].supports_query: ")


# --- validation messages name their path ------------------------------------------------------


def test_bad_auth_style_names_the_upstream_index() -> None:
    data = document(upstreams=[upstream(), upstream(name="relay", auth="basic")])
    assert only_problem(data) == "upstreams[1].auth: must be mj-api-secret or bearer"


def test_duplicate_upstream_name() -> None:
    problem = only_problem(document(upstreams=[upstream(), upstream()]))
    assert problem.startswith("upstreams[1].name: ")
    assert "duplicate" in problem and "main" in problem


@pytest.mark.parametrize("name", ["Main", "main upstream", "mäin", "main.eu"])
def test_upstream_name_pattern(name: str) -> None:
    problem = only_problem(document(upstreams=[upstream(name=name)]))
    assert problem == "upstreams[0].name: must match [a-z0-9_-]+"


def test_base_url_must_not_hold_credentials() -> None:
    data = document(upstreams=[upstream(base_url="https://user:pw-secret@mj.example.com")])
    problem = only_problem(data)
    assert problem.startswith("upstreams[0].base_url: ")
    assert "credentials" in problem
    assert "pw-secret" not in problem


@pytest.mark.parametrize("url", ["ftp://mj.example.com", "mj.example.com", "http://", "/mj"])
def test_base_url_must_be_http_with_a_host(url: str) -> None:
    problem = only_problem(document(upstreams=[upstream(base_url=url)]))
    assert problem == "upstreams[0].base_url: must be an http:// or https:// URL with a host"


def test_base_url_trailing_slash_is_dropped() -> None:
    config = config_from_dict(document(upstreams=[upstream(base_url="http://h:1/api/")]), env={})
    assert config.upstreams[0].base_url == "http://h:1/api"


def test_list_by_ids_path_is_one_of_two_choices() -> None:
    problem = only_problem(document(upstreams=[upstream(list_by_ids_path="/mj/task/list")]))
    assert problem == (
        "upstreams[0].list_by_ids_path: must be /mj/task/list-by-condition or /mj/task/list-by-ids"
    )
    config = config_from_dict(
        document(upstreams=[upstream(list_by_ids_path="/mj/task/list-by-ids")]), env={}
    )
    assert config.upstreams[0].list_by_ids_path == "/mj/task/list-by-ids"


def test_unknown_key_in_an_upstream() -> None:
    problem = only_problem(document(upstreams=[upstream(api_key="x")]))
    assert problem.startswith("upstreams[0].api_key: unknown key")


def test_unknown_key_in_a_section() -> None:
    problem = only_problem(document(cache={"terminal_ttl": 5}))
    assert problem.startswith("cache.terminal_ttl: unknown key")


def test_unknown_top_level_key_is_named() -> None:
    problem = only_problem(document(upstream=[upstream()]))
    path, _, message = problem.partition(": ")
    assert path.endswith("upstream")
    assert message.startswith("unknown key")


@pytest.mark.parametrize(
    "keys",
    [{}, {"keys": []}, {"key": ""}, {"key_sha256s": []}],
    ids=["none", "empty-list", "empty", "empty-digests"],
)
def test_client_needs_a_key(keys: dict[str, Any]) -> None:
    assert only_problem(document(clients=[{"name": "alice", **keys}])) == (
        "clients[0]: needs a key: key, keys, key_sha256 or key_sha256s"
    )


@pytest.mark.parametrize("digest", ["abc", "g" * 64, hash_key("x")[:-1], hash_key("x") + "0"])
def test_client_key_sha256_must_be_64_hex_digits(digest: str) -> None:
    problem = only_problem(document(clients=[{"name": "alice", "key_sha256": digest}]))
    assert problem.startswith("clients[0].key_sha256: must be 64 hex digits")


def test_key_sha256_in_upper_case_is_accepted_as_the_same_digest() -> None:
    digest = hash_key(CALLER_KEY)
    config = config_from_dict(
        document(clients=[{"name": "alice", "key_sha256": digest.upper()}]), env={}
    )
    assert config.clients[0].key_sha256 == digest


def test_hash_key_is_the_hex_sha256_of_the_key() -> None:
    assert hash_key("password") == (
        "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    )
    assert hash_key(CALLER_KEY) == hashlib.sha256(CALLER_KEY.encode()).hexdigest()


def test_client_key_is_stored_only_as_its_sha256_digest() -> None:
    config = config_from_dict(document(), env={})
    assert config.clients[0].key_sha256 == hash_key(CALLER_KEY)
    assert CALLER_KEY not in repr(config.clients[0])


def test_unknown_upstream_in_a_client_allow_list() -> None:
    data = document(clients=[{"name": "alice", "key": CALLER_KEY, "upstreams": ["main", "eu"]}])
    assert only_problem(data) == "clients[0].upstreams: unknown upstream 'eu'"


def test_client_allow_list_keeps_order_without_duplicates() -> None:
    data = document(
        upstreams=[upstream(), upstream(name="relay")],
        clients=[{"name": "alice", "key": CALLER_KEY, "upstreams": ["relay", "main", "relay"]}],
    )
    assert config_from_dict(data, env={}).clients[0].upstreams == ("relay", "main")


def test_two_clients_with_the_same_key() -> None:
    data = document(
        clients=[
            {"name": "alice", "key": CALLER_KEY},
            {"name": "bob", "key": "bob-secret-key"},
            {"name": "carol", "key": CALLER_KEY},
        ]
    )
    problem = only_problem(data)
    assert problem.startswith("clients[2]")
    assert "same key" in problem
    assert CALLER_KEY not in problem


def test_same_key_given_once_as_key_and_once_as_digest_is_a_duplicate() -> None:
    data = document(
        clients=[
            {"name": "alice", "key": CALLER_KEY},
            {"name": "bob", "key_sha256": hash_key(CALLER_KEY)},
        ]
    )
    assert only_problem(data).startswith("clients[1]")


def test_duplicate_client_name() -> None:
    data = document(
        clients=[{"name": "alice", "key": CALLER_KEY}, {"name": "alice", "key": "other-key"}]
    )
    assert only_problem(data).startswith("clients[1].name: duplicate")


def test_no_clients_and_no_allow_anonymous_is_an_error() -> None:
    data = {"upstreams": [upstream()]}
    problem = only_problem(data)
    assert problem.startswith("clients: ")
    assert "allow_anonymous" in problem
    assert only_problem({**data, "clients": []}) == problem
    assert only_problem({**data, "allow_anonymous": False}) == problem


def test_allow_anonymous_without_clients_is_valid() -> None:
    config = config_from_dict({"upstreams": [upstream()], "allow_anonymous": True}, env={})
    assert config.allow_anonymous is True
    assert config.clients == ()


@pytest.mark.parametrize("path", ["/other/thing", "mj/account/list", "/mj/a b", "/mj/"])
def test_passthrough_paths_must_be_under_mj(path: str) -> None:
    data = document(passthrough=["/mj/account/list", path])
    assert only_problem(data) == "passthrough[1]: must be a path under /mj, like /mj/account/list"


def test_valid_passthrough_paths_are_kept() -> None:
    data = document(passthrough=["/mj/account/list", "/mj-fast/account/info"])
    assert config_from_dict(data, env={}).passthrough == (
        "/mj/account/list",
        "/mj-fast/account/info",
    )


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "localhost:6379", "mysql://db/0"])
def test_bad_redis_url(url: str) -> None:
    problem = only_problem(document(redis={"url": url}))
    assert problem.startswith("redis.url: must be a redis://")


@pytest.mark.parametrize(
    "url", ["", "redis://127.0.0.1:6379/0", "rediss://:pw@cache:6380/1", "unix:///tmp/r.sock"]
)
def test_good_redis_urls(url: str) -> None:
    assert config_from_dict(document(redis={"url": url}), env={}).redis.url.reveal() == url


def test_upstreams_must_be_a_non_empty_list() -> None:
    assert only_problem(document(upstreams=[])) == "upstreams: must be a non-empty list"
    assert only_problem(document(upstreams=None)) == "upstreams: must be a non-empty list"


def test_required_upstream_fields_are_named() -> None:
    problems = problems_of(document(upstreams=[{"auth": "bearer"}]))
    assert sorted(problems) == [
        "upstreams[0].base_url: is required",
        "upstreams[0].key: is required",
        "upstreams[0].name: is required",
    ]


def test_several_problems_are_reported_at_once() -> None:
    data = {
        "upstreams": [
            upstream(auth="token"),
            upstream(name="Relay", base_url="ftp://relay"),
            upstream(name="third", key="${MISSING_KEY}"),
        ],
        "clients": [{"name": "alice", "key": CALLER_KEY, "key_sha256": "00"}],
        "redis": {"url": "http://nope"},
        "server": {"port": 70000},
        "logging": {"format": "xml"},
    }
    problems = problems_of(data)
    expected_paths = [
        "upstreams[0].auth",
        "upstreams[1].name",
        "upstreams[1].base_url",
        "upstreams[2].key",
        "clients[0].key_sha256",
        "redis.url",
        "server.port",
        "logging.format",
    ]
    assert sorted(p.split(": ", 1)[0] for p in problems) == sorted(expected_paths)
    assert all("\n" not in p for p in problems)
    assert all(UPSTREAM_KEY not in p and CALLER_KEY not in p for p in problems)


def test_a_document_that_is_not_a_mapping() -> None:
    problems = problems_of(["upstreams"])
    assert any("must be a mapping" in p for p in problems)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml", env={})
    assert len(caught.value.problems) == 1
    assert "missing.yaml" in caught.value.problems[0]


def test_invalid_yaml_is_one_line_and_does_not_echo_the_file(tmp_path: Path) -> None:
    """A syntax error is reported in one line, and never quotes the offending line: that line
    may well hold a key (DESIGN.md section 2: keys never appear in an error message)."""
    path = tmp_path / "broken.yaml"
    path.write_text(
        "upstreams:\n"
        "  - name: main\n"
        "    base_url: http://mj.example.com\n"
        f'    key: "{UPSTREAM_KEY}\n'
        "    auth: bearer\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    (problem,) = caught.value.problems
    assert str(path) in problem
    assert "\n" not in problem
    assert UPSTREAM_KEY not in problem


# --- frozen objects and secrets -------------------------------------------------------------


def test_config_objects_are_frozen() -> None:
    config = config_from_dict(document(), env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.allow_anonymous = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upstreams[0].key = Secret("other")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    assert isinstance(config.upstreams, tuple)
    assert isinstance(config.clients, tuple)
    assert isinstance(config.passthrough, tuple)


def test_secret_never_shows_its_value() -> None:
    secret = Secret(UPSTREAM_KEY)
    assert secret.reveal() == UPSTREAM_KEY
    assert UPSTREAM_KEY not in repr(secret)
    assert UPSTREAM_KEY not in str(secret)
    assert UPSTREAM_KEY not in f"{secret}"
    assert UPSTREAM_KEY not in repr([secret, {"k": secret}])
    assert Secret(UPSTREAM_KEY) == secret
    assert Secret("other-value") != secret


def test_repr_of_a_config_holds_no_key() -> None:
    data = document(
        redis={"url": "redis://:redis-password-77@cache:6379/0"},
        upstreams=[upstream(), upstream(name="relay", auth="bearer", key="relay-secret-3141")],
    )
    config = config_from_dict(data, env={})
    text = repr(config) + str(config)
    for secret in (UPSTREAM_KEY, "relay-secret-3141", CALLER_KEY, "redis-password-77"):
        assert secret not in text


def test_redacted_hides_upstream_keys_and_the_redis_password() -> None:
    data = document(
        redis={"url": "redis://default:redis-password-77@cache:6379/0"},
        upstreams=[upstream(), upstream(name="relay", auth="bearer", key="relay-secret-3141")],
        metrics={"token": "metrics-token-2718"},
    )
    config = config_from_dict(data, env={})
    shown = redacted(config)
    text = repr(shown) + repr(config)
    secrets = (UPSTREAM_KEY, "relay-secret-3141", CALLER_KEY, "redis-password-77")
    for secret in (*secrets, "metrics-token-2718"):
        assert secret not in text
    assert shown["redis"]["url"] == "redis://default:<redacted>@cache:6379/0"
    assert [u["key"] for u in shown["upstreams"]] == ["<redacted>", "<redacted>"]
    # Everything that is not a secret is shown as configured.
    assert shown["upstreams"][1]["name"] == "relay"
    assert shown["upstreams"][1]["auth"] == "bearer"
    assert shown["clients"][0]["key_sha256"] == hash_key(CALLER_KEY)


def test_redacted_password_only_redis_url() -> None:
    config = config_from_dict(document(redis={"url": "rediss://:pw-only-secret@cache:6380"}), {})
    assert redacted(config)["redis"]["url"] == "rediss://:<redacted>@cache:6380"


def test_redacted_keeps_a_redis_url_without_password() -> None:
    config = config_from_dict(document(redis={"url": "redis://cache:6379/3"}), env={})
    assert redacted(config)["redis"]["url"] == "redis://cache:6379/3"


def test_redis_config_default_is_the_embedded_store() -> None:
    assert RedisConfig().url.reveal() == ""
    config: Config = config_from_dict(document(), env={})
    assert config.redis.url.reveal() == ""


# --- defaults: stated once, in the dataclasses ------------------------------------------------


def test_a_minimal_config_takes_every_default_from_the_dataclasses() -> None:
    config = config_from_dict(document(), env={})
    assert config.server == ServerConfig()
    assert config.redis == RedisConfig()
    assert config.rate_limit == RateLimitConfig()
    assert config.cache == CacheConfig()
    assert config.fanout == FanoutConfig()
    assert config.circuit == CircuitConfig()
    assert config.metrics == MetricsConfig()
    assert config.logging == LoggingConfig()
    assert (config.allow_anonymous, config.passthrough) == (False, ())
    assert config.upstreams[0] == UpstreamConfig(
        name="main", base_url="http://mj.example.com", key=Secret(UPSTREAM_KEY)
    )
    assert config.clients[0].rate_limit is None and config.clients[0].admin is False


def test_empty_sections_and_an_invalid_value_fall_back_to_the_same_defaults() -> None:
    data = document(server={}, redis=None, cache={}, fanout=None, metrics={}, logging={})
    config = config_from_dict(data, env={})
    assert (config.server, config.cache, config.logging) == (
        ServerConfig(),
        CacheConfig(),
        LoggingConfig(),
    )
    assert only_problem(document(server={"port": 0})).startswith("server.port: ")


def test_the_defaults_the_readme_promises() -> None:
    server = ServerConfig()
    assert server.max_body_bytes == 33554432  # 32 MiB: the C# upstream takes about 30 MB
    assert (server.max_header_bytes, server.header_timeout_s, server.body_timeout_s) == (
        16384,
        10,
        30,
    )
    assert (server.cors, server.secret_key, server.public_url) == (CorsConfig(), Secret(""), "")
    assert CorsConfig().allow_origins == ()
    upstream = UpstreamConfig(name="u", base_url="http://u", key=Secret("k"))
    assert upstream.max_response_bytes == 8 * 1024 * 1024
    assert upstream.auth == "mj-api-secret"


def test_every_config_field_is_named_in_the_example() -> None:
    text = EXAMPLE.read_text()
    sections = (
        ServerConfig,
        CorsConfig,
        RedisConfig,
        UpstreamConfig,
        RateLimitConfig,
        CacheConfig,
        FanoutConfig,
        CircuitConfig,
        MetricsConfig,
        LoggingConfig,
        WatcherConfig,
        WebhooksConfig,
        WebhookConfig,
        Quota,
        QuotaConfig,
        SubmitConfig,
        LedgerConfig,
        Config,
    )
    for section in sections:
        for field in dataclasses.fields(section):
            assert f"{field.name}:" in text, f"{section.__name__}.{field.name}"
    client_keys = ("key:", "key_sha256:", "keys:", "key_sha256s:", "admin:", "team:", "visibility:")
    for client_key in client_keys:
        assert client_key in text


# --- new server and upstream settings ---------------------------------------------------------


def test_new_server_settings_are_read() -> None:
    secret_key = "s" * 32
    data = document(
        server={
            "max_header_bytes": 8192,
            "header_timeout_s": 2.5,
            "body_timeout_s": 12,
            "cors": {"allow_origins": ["https://UI.example.com", "http://localhost:5173"]},
            "secret_key": "${SECRET_KEY}",
            "public_url": "https://mj.example.com/gateway/",
        },
        upstreams=[upstream(max_response_bytes=1024)],
    )
    config = config_from_dict(data, env={"SECRET_KEY": secret_key})
    server = config.server
    assert (server.max_header_bytes, server.header_timeout_s, server.body_timeout_s) == (
        8192,
        2.5,
        12,
    )
    # Origins as browsers send them (lower case); the public URL without a trailing slash.
    assert server.cors.allow_origins == ("https://ui.example.com", "http://localhost:5173")
    assert server.secret_key.reveal() == secret_key
    assert server.public_url == "https://mj.example.com/gateway"
    assert config.upstreams[0].max_response_bytes == 1024
    assert secret_key not in repr(config)
    assert redacted(config)["server"]["secret_key"] == "<redacted>"


def test_cors_may_allow_every_origin() -> None:
    config = config_from_dict(document(server={"cors": {"allow_origins": ["*"]}}), env={})
    assert config.server.cors.allow_origins == ("*",)


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"max_header_bytes": 100}, "server.max_header_bytes: must be at least 1024"),
        ({"header_timeout_s": 0}, "server.header_timeout_s: must be greater than 0"),
        ({"body_timeout_s": -1}, "server.body_timeout_s: must be greater than 0"),
        ({"max_body_bytes": 0}, "server.max_body_bytes: must be at least 1"),
        ({"cors": {"allow_origins": "*"}}, "server.cors.allow_origins: must be a list of origins"),
        (
            {"cors": {"allow_origins": ["https://a.example.com", "https://b.example.com/"]}},
            'server.cors.allow_origins[1]: must be "*" or an origin like '
            "https://app.example.com (no path)",
        ),
        (
            {"cors": {"allow_origins": ["*", "https://a.example.com"]}},
            'server.cors.allow_origins: "*" allows every origin: list it alone',
        ),
        (
            {"cors": {"origins": ["*"]}},
            "server.cors.origins: unknown key (expected one of: allow_origins)",
        ),
        (
            {"public_url": "mj.example.com"},
            "server.public_url: must be an http:// or https:// URL with a host",
        ),
        (
            {"public_url": "https://u:p@mj.example.com"},
            "server.public_url: must not hold credentials",
        ),
        (
            {"public_url": "https://mj.example.com/?a=1"},
            "server.public_url: must not have a query or fragment",
        ),
    ],
)
def test_new_server_settings_are_validated(server: dict[str, Any], expected: str) -> None:
    assert only_problem(document(server=server)) == expected


def test_a_short_secret_key_is_refused_without_showing_it() -> None:
    problem = only_problem(document(server={"secret_key": "short-signing-key-9"}))
    assert problem.startswith("server.secret_key: must be at least 32 characters")
    assert "short-signing-key-9" not in problem


def test_max_response_bytes_is_validated() -> None:
    problem = only_problem(document(upstreams=[upstream(max_response_bytes=0)]))
    assert problem == "upstreams[0].max_response_bytes: must be at least 1"


# --- weak keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["password", "foo", "123456", "Password", "QWERTY", "changeme"])
def test_a_well_known_weak_key_is_refused_naming_the_client(key: str) -> None:
    data = document(
        clients=[
            {"name": "alice", "key": CALLER_KEY},
            {"name": "dashboards", "key": OTHER_KEY},
            {"name": "ops", "key": key, "admin": True},
        ]
    )
    assert only_problem(data) == "clients[2].key: is a well-known weak key (client 'ops')"


def test_the_digest_of_a_weak_key_is_refused_too() -> None:
    data = document(clients=[{"name": "dashboards", "key_sha256": hash_key("password").upper()}])
    assert only_problem(data) == (
        "clients[0].key_sha256: is the digest of a well-known weak key (client 'dashboards')"
    )


def test_each_weak_key_is_one_line_wherever_it_is_given() -> None:
    data = document(
        clients=[
            {"name": "alice", "key": CALLER_KEY, "keys": ["letmein"]},
            {"name": "ops", "key_sha256s": [hash_key(OTHER_KEY), hash_key("foo")]},
        ]
    )
    assert problems_of(data) == [
        "clients[0].keys[0]: is a well-known weak key (client 'alice')",
        "clients[1].key_sha256s[1]: is the digest of a well-known weak key (client 'ops')",
    ]


def test_the_guessable_keys_the_example_used_to_ship_are_refused() -> None:
    """The example once gave dashboards the digest of 'password' and ops that of 'foo'."""
    env = {
        **EXAMPLE_ENV,
        "DASHBOARDS_KEY_SHA256": hash_key("password"),
        "OPS_KEY_SHA256": hash_key("foo"),
    }
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE, env=env)
    assert caught.value.problems == [
        "clients[1].key_sha256: is the digest of a well-known weak key (client 'dashboards')",
        "clients[2].key_sha256s[0]: is the digest of a well-known weak key (client 'ops')",
    ]


def test_the_example_takes_real_digests_from_its_variables() -> None:
    env = {
        **EXAMPLE_ENV,
        "DASHBOARDS_KEY_SHA256": hash_key(CALLER_KEY),
        "OPS_KEY_SHA256": hash_key(OTHER_KEY),
    }
    _, dashboards, ops = load_config(EXAMPLE, env=env).clients
    assert dashboards.key_sha256s == (hash_key(CALLER_KEY),)
    assert ops.key_sha256s == (hash_key(OTHER_KEY),)


# --- several keys per client ------------------------------------------------------------------


def test_a_client_may_hold_keys_in_any_combination() -> None:
    keys = [f"rotation-key-{n}-{'x' * 12}" for n in range(6)]
    data = document(
        clients=[
            {
                "name": "alice",
                "key": keys[0],
                "key_sha256": hash_key(keys[1]),
                "keys": [keys[2], keys[3]],
                "key_sha256s": [hash_key(keys[4]), hash_key(keys[5]).upper()],
            },
            {"name": "bob", "keys": ["bob-only-key-13579"]},
            {"name": "carol", "key_sha256s": [hash_key("carol-only-key-97531")]},
        ]
    )
    alice, bob, carol = config_from_dict(data, env={}).clients
    assert alice.key_sha256s == tuple(hash_key(k) for k in keys)
    assert alice.key_sha256 == hash_key(keys[0])
    assert bob.key_sha256s == (hash_key("bob-only-key-13579"),)
    assert carol.key_sha256s == (hash_key("carol-only-key-97531"),)


def test_a_key_shared_by_two_clients_names_both() -> None:
    data = document(
        clients=[
            {"name": "alice", "keys": [OTHER_KEY, CALLER_KEY]},
            {"name": "bob", "key": "bob-secret-key"},
            {"name": "carol", "key_sha256s": [hash_key("carol-key-5555"), hash_key(CALLER_KEY)]},
        ]
    )
    assert only_problem(data) == (
        "clients[2].key_sha256s[1]: client 'carol' has the same key as clients[0].keys[1] "
        "(client 'alice')"
    )


def test_a_key_given_twice_to_one_client_is_a_problem() -> None:
    data = document(clients=[{"name": "alice", "key": CALLER_KEY, "keys": [CALLER_KEY]}])
    assert only_problem(data) == (
        "clients[0].keys[0]: client 'alice' has the same key as clients[0].key (client 'alice')"
    )


@pytest.mark.parametrize("field", ["keys", "key_sha256s"])
def test_key_lists_must_be_lists(field: str) -> None:
    data = document(clients=[{"name": "alice", field: "one-key-only-12345"}])
    # One line: the client does have a key, given in the wrong shape.
    assert only_problem(data) == f"clients[0].{field}: must be a list"


def test_bad_entries_in_key_lists_name_their_index() -> None:
    data = document(clients=[{"name": "alice", "keys": [CALLER_KEY, None], "key_sha256s": ["abc"]}])
    assert sorted(problems_of(data)) == [
        "clients[0].key_sha256s[0]: must be 64 hex digits (see: mjgate hash-key)",
        "clients[0].keys[1]: must be a non-empty string",
    ]


def test_unset_var_in_a_key_list_is_reported_once() -> None:
    data = document(clients=[{"name": "alice", "keys": [CALLER_KEY, "${NEW_KEY}"]}])
    assert only_problem(data) == "clients[0].keys[1]: environment variable NEW_KEY is not set"


# --- malformed interpolation and upstream weights ---------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${ALICE_KEY", "has an unclosed or malformed ${...}"),
        ("${1ALICE}", "has an unclosed or malformed ${...}"),
        ("$ALICE_KEY", "has $NAME without braces, which is not interpolated"),
        ("prefix-$ALICE_KEY", "has $NAME without braces, which is not interpolated"),
    ],
)
def test_malformed_variables_are_problems_not_literal_keys(value: str, message: str) -> None:
    data = document(clients=[{"name": "alice", "key": value}])
    problem = only_problem(data, env={"ALICE_KEY": CALLER_KEY, "ALICE": CALLER_KEY})
    assert problem.startswith(f"clients[0].key: {message}")


def test_the_same_mistake_twice_in_one_value_is_one_line() -> None:
    problem = only_problem(document(clients=[{"name": "alice", "key": "$A-$B"}]))
    assert problem.startswith("clients[0].key: has $NAME without braces")


def test_a_doubled_dollar_is_a_literal_dollar() -> None:
    data = document(clients=[{"name": "alice", "key": "pa$$word-with-$${braces}-${SUFFIX}"}])
    config = config_from_dict(data, env={"SUFFIX": "end"})
    assert config.clients[0].key_sha256 == hash_key("pa$word-with-${braces}-end")


def test_a_value_from_the_environment_is_taken_as_it_is() -> None:
    key = "from-env-$HOME-${PATH}-$$"
    config = config_from_dict(document(clients=[{"name": "alice", "key": "${K}"}]), {"K": key})
    assert config.clients[0].key_sha256 == hash_key(key)


def test_strings_without_a_dollar_are_left_alone() -> None:
    config = config_from_dict(document(redis={"key_prefix": "team-a"}), env={})
    assert config.redis.key_prefix == "team-a"


def test_every_upstream_with_weight_zero_is_a_problem() -> None:
    data = document(upstreams=[upstream(weight=0), upstream(name="relay", weight="0")])
    assert only_problem(data) == "upstreams: every upstream has weight 0, so none takes new submits"
    fine = document(upstreams=[upstream(weight=0), upstream(name="relay", weight=0.5)])
    assert [u.weight for u in config_from_dict(fine, env={}).upstreams] == [0, 0.5]


# --- Redis passwords in check-config output ---------------------------------------------------


def test_a_sentinel_entry_with_a_password_is_refused_without_showing_it() -> None:
    data = document(
        redis={"sentinels": ["sentinel-0:26379", "redis://:sentinel-pw-4242@sentinel-1:26379"]}
    )
    problem = only_problem(data)
    assert problem.startswith("redis.sentinels[1]: must be host:port, without credentials")
    assert "sentinel-pw-4242" not in problem


@pytest.mark.parametrize("entry", ["sentinel-0", "sentinel-0:port", ":26379", "s/0:26379", "s:0"])
def test_a_sentinel_entry_must_be_host_and_port(entry: str) -> None:
    assert only_problem(document(redis={"sentinels": [entry]})) == (
        "redis.sentinels[0]: must be host:port"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:p@ss:w0rd-77@/0", "redis://:<redacted>@/0"),
        ("redis://default:p@ss:w0rd-77@cache:6379/0", "redis://default:<redacted>@cache:6379/0"),
        ("redis://cache:6379/0?password=p@ss:w0rd-77", "redis://cache:6379/0?password=<redacted>"),
        (
            "rediss://cache:6380/0?ssl_cert_reqs=none&PASSWORD=p@ss:w0rd-77",
            "rediss://cache:6380/0?ssl_cert_reqs=none&PASSWORD=<redacted>",
        ),
    ],
)
def test_check_config_output_never_holds_the_redis_password(url: str, shown: str) -> None:
    """``redacted`` is what ``mjgate check-config`` prints: with Sentinel, ``url`` lends the
    master's password, which may hold ``@`` and ``:``."""
    data = document(
        redis={"url": url, "sentinels": ["sentinel-0:26379", "10.0.0.7:26380"]},
        metrics={"token": "metrics-token-1618"},
    )
    shown_config = redacted(config_from_dict(data, env={}))
    printed = yaml.safe_dump(shown_config, sort_keys=False)
    assert "w0rd-77" not in printed and "metrics-token-1618" not in printed
    assert shown_config["redis"]["url"] == shown
    # Sentinels as they are written in a config file.
    assert shown_config["redis"]["sentinels"] == ["sentinel-0:26379", "10.0.0.7:26380"]
