"""Config contract (DESIGN.md section 4): YAML, ``${VAR}`` interpolation, frozen typed objects,
one line per problem naming its YAML path, and secrets that never show themselves."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError, RedisConfig, Secret, hash_key, redacted
from gateway.configfile import config_from_dict, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
EXAMPLE_ENV = {
    "MAIN_MJ_KEY": "main-upstream-secret-4711",
    "RELAY_MJ_KEY": "relay-upstream-secret-0815",
    "ALICE_KEY": "alice-caller-secret-1234",
}
UPSTREAM_KEY = "upstream-secret-abcdef"
CALLER_KEY = "caller-secret-987654"


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
    assert dashboards.key_sha256 == hash_key("password")
    assert dashboards.upstreams is None
    assert not dashboards.admin and ops.admin
    assert ops.key_sha256 == hash_key("foo")

    assert config.allow_anonymous is False
    assert config.redis.url.reveal() == ""  # ${REDIS_URL:-} unset: the embedded store
    assert config.redis.key_prefix == "mjgate"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert config.server.max_body_bytes == 10485760
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


def test_client_needs_key_or_key_sha256() -> None:
    assert only_problem(document(clients=[{"name": "alice"}])) == (
        "clients[0]: needs key or key_sha256"
    )


def test_client_may_not_have_both_key_and_key_sha256() -> None:
    data = document(
        clients=[{"name": "alice", "key": CALLER_KEY, "key_sha256": hash_key(CALLER_KEY)}]
    )
    assert only_problem(data) == "clients[0]: set key or key_sha256, not both"


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
        "clients[0]",
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
