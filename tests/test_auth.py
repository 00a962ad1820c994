"""Auth normalization (DESIGN.md section 2): three ways to present a key, the precedence rule,
digest comparison, and 401 JSON before anything reaches an upstream."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth import ANONYMOUS, ClientRegistry, extract_key
from gateway.config import Config, hash_key
from gateway.configfile import config_from_dict
from gateway.errors import GatewayError
from tests.support import (
    CALLER_KEYS,
    GatewayThread,
    SimProcess,
    caller,
    make_config,
    running_gateway,
)

KEY = "caller-key-5f3a9c"
OTHER = "other-caller-key-77"


def headers(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers: lower-case names, as every ASGI server delivers them."""
    return [(name.lower().encode(), value.encode("latin-1")) for name, value in pairs]


# --- extract_key --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_in_any_case(scheme: str) -> None:
    assert extract_key(headers(("Authorization", f"{scheme} {KEY}"))) == KEY


def test_bearer_with_extra_spaces() -> None:
    assert extract_key(headers(("Authorization", f"  Bearer   {KEY}  "))) == KEY


def test_raw_authorization() -> None:
    assert extract_key(headers(("Authorization", KEY))) == KEY


def test_mj_api_secret() -> None:
    assert extract_key(headers(("mj-api-secret", KEY))) == KEY


def test_mj_api_secret_is_stripped_of_surrounding_space() -> None:
    assert extract_key(headers(("mj-api-secret", f" {KEY} "))) == KEY


def test_no_credentials() -> None:
    assert extract_key([]) is None
    assert extract_key(headers(("content-type", "application/json"))) is None


def test_authorization_wins_over_mj_api_secret() -> None:
    both = headers(("mj-api-secret", OTHER), ("Authorization", f"Bearer {KEY}"))
    assert extract_key(both) == KEY
    raw = headers(("Authorization", KEY), ("mj-api-secret", OTHER))
    assert extract_key(raw) == KEY


@pytest.mark.parametrize(
    "authorization", ["", "   ", "midjourney-proxy", "Bearer midjourney-proxy", "Bearer", "Bearer "]
)
def test_empty_or_placeholder_authorization_falls_back_to_mj_api_secret(
    authorization: str,
) -> None:
    assert extract_key(headers(("Authorization", authorization), ("mj-api-secret", KEY))) == KEY


@pytest.mark.parametrize("authorization", ["", "midjourney-proxy", "Bearer", "Bearer   "])
def test_empty_or_placeholder_authorization_alone_is_no_key(authorization: str) -> None:
    assert extract_key(headers(("Authorization", authorization))) is None


def test_empty_mj_api_secret_is_no_key() -> None:
    assert extract_key(headers(("mj-api-secret", ""))) is None


def test_a_raw_key_that_contains_a_space_is_kept_whole() -> None:
    assert extract_key(headers(("Authorization", "team key 42"))) == "team key 42"


TWICE = [
    ("mj-api-secret", (KEY, OTHER)),
    ("mj-api-secret", (KEY, KEY)),
    ("Authorization", (f"Bearer {KEY}", f"Bearer {OTHER}")),
    ("Authorization", ("midjourney-proxy", f"Bearer {KEY}")),
    ("Authorization", (KEY, "")),
]


@pytest.mark.parametrize(("name", "values"), TWICE)
def test_a_credential_header_given_twice_is_refused_not_guessed(
    name: str, values: tuple[str, str]
) -> None:
    """Which of two keys would count is a guess (the last one won): 400, whatever they are."""
    with pytest.raises(GatewayError) as refused:
        extract_key(headers(*((name, value) for value in values), ("x-other", "1")))
    assert refused.value.status == 400
    assert f"{name} header is given twice" in refused.value.description
    assert KEY not in refused.value.description and OTHER not in refused.value.description


# --- ClientRegistry ---------------------------------------------------------------------------


def registry_config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "upstreams": [{"name": "main", "base_url": "http://127.0.0.1:9", "key": "upstream-k"}],
        "clients": [
            {"name": "alice", "key": KEY},
            {"name": "dash", "key_sha256": hash_key(OTHER)},
        ],
        **extra,
    }
    return config_from_dict(data, env={})


def test_registry_finds_a_client_configured_with_its_key() -> None:
    client = ClientRegistry(registry_config()).authenticate(headers(("mj-api-secret", KEY)))
    assert client is not None
    assert client.name == "alice"


def test_registry_finds_a_client_configured_with_only_its_digest() -> None:
    registry = ClientRegistry(registry_config())
    client = registry.authenticate(headers(("Authorization", f"Bearer {OTHER}")))
    assert client is not None
    assert client.name == "dash"


def test_registry_refuses_an_unknown_key() -> None:
    registry = ClientRegistry(registry_config())
    assert registry.authenticate(headers(("mj-api-secret", "not-a-known-key"))) is None
    # The digest itself is not a key.
    assert registry.authenticate(headers(("mj-api-secret", hash_key(KEY)))) is None


def test_registry_refuses_a_missing_key_without_allow_anonymous() -> None:
    assert ClientRegistry(registry_config()).authenticate([]) is None


def test_registry_lets_anonymous_in_only_when_allowed_and_no_key_given() -> None:
    registry = ClientRegistry(registry_config(allow_anonymous=True))
    assert registry.authenticate([]) is ANONYMOUS
    assert ANONYMOUS.name == "anonymous"
    # A wrong key is still wrong: anonymous access is not a fallback for bad credentials.
    assert registry.authenticate(headers(("mj-api-secret", "not-a-known-key"))) is None
    client = registry.authenticate(headers(("Authorization", KEY)))
    assert client is not None
    assert client.name == "alice"


def test_registry_with_anonymous_only() -> None:
    config = config_from_dict(
        {
            "upstreams": [{"name": "main", "base_url": "http://127.0.0.1:9", "key": "k"}],
            "allow_anonymous": True,
        },
        env={},
    )
    registry = ClientRegistry(config)
    assert registry.authenticate([]) is ANONYMOUS
    assert registry.authenticate(headers(("mj-api-secret", KEY))) is None


def test_registry_accepts_every_key_of_a_client() -> None:
    keys = [f"rotating-key-{n}-5f3a9c" for n in range(4)]
    config = registry_config(
        clients=[
            {"name": "alice", "key": keys[0], "keys": [keys[1]]},
            {"name": "dash", "key_sha256": hash_key(keys[2]), "key_sha256s": [hash_key(keys[3])]},
        ]
    )
    registry = ClientRegistry(config)
    for key, name in zip(keys, ["alice", "alice", "dash", "dash"], strict=True):
        client = registry.authenticate(headers(("mj-api-secret", key)))
        assert client is not None and client.name == name, key
    assert registry.authenticate(headers(("mj-api-secret", "rotating-key-9-5f3a9c"))) is None


# --- through a running gateway with real sims --------------------------------------------------
# One gateway and one HTTP client for the module: the sims are shared by the session, so tests
# compare the sims' counters before and after instead of resetting them.


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def gateway(session_sims: list[SimProcess]) -> Iterator[GatewayThread]:
    for sim in session_sims:
        sim.reset()  # no faults left over from other modules
    with running_gateway(make_config(session_sims)) as running:
        yield running


def stats(http: httpx.Client, sim: SimProcess) -> dict[str, Any]:
    response = http.get(f"{sim.url}/_sim/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def upstream_total(http: httpx.Client, sims: list[SimProcess]) -> int:
    return sum(int(stats(http, sim)["total"]) for sim in sims)


def seeded_id(http: httpx.Client, sim: SimProcess) -> str:
    task_id = f"auth{uuid.uuid4().hex[:16]}"
    http.post(f"{sim.url}/_sim/tasks", json={"id": task_id, "status": "SUCCESS"}).raise_for_status()
    return task_id


def fetch(
    http: httpx.Client, gateway: GatewayThread, task_id: str, request_headers: dict[str, str]
) -> httpx.Response:
    return http.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=request_headers)


def submit(
    http: httpx.Client, gateway: GatewayThread, request_headers: dict[str, str]
) -> httpx.Response:
    # A prompt of its own: the same submit again would be answered as a duplicate.
    return http.post(
        f"{gateway.url}/mj/submit/imagine",
        json={"prompt": f"a lighthouse at dawn {uuid.uuid4().hex[:8]}"},
        headers=request_headers,
    )


def assert_401_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "description", "request_id", "result"}
    assert body["result"] is None  # bot plugins read rj["result"] on every answer
    assert isinstance(body["code"], int)
    assert isinstance(body["description"], str) and body["description"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize("style", ["bearer", "raw", "mj-api-secret"])
def test_each_way_of_presenting_a_key_fetches_a_task(
    http: httpx.Client, gateway: GatewayThread, session_sims: list[SimProcess], style: str
) -> None:
    task_id = seeded_id(http, session_sims[0])
    response = fetch(http, gateway, task_id, caller("alice", style))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == task_id


@pytest.mark.parametrize("style", ["bearer", "raw", "mj-api-secret"])
def test_each_way_of_presenting_a_key_submits(
    http: httpx.Client, gateway: GatewayThread, session_sims: list[SimProcess], style: str
) -> None:
    before = stats(http, session_sims[0])["submits"]
    response = submit(http, gateway, caller("bob", style))
    assert response.status_code == 200, response.text
    assert response.json()["code"] == 1
    # bob may use only the first upstream; the submit went there.
    assert stats(http, session_sims[0])["submits"] == before + 1


@pytest.mark.parametrize(
    "request_headers",
    [
        {"Authorization": "Bearer not-a-caller-key"},
        {"Authorization": "not-a-caller-key"},
        {"mj-api-secret": "not-a-caller-key"},
        # An upstream's own key is not a caller key either.
        {"mj-api-secret": "java-upstream-key-1"},
        # Authorization wins even when mj-api-secret holds a good key.
        {"Authorization": "Bearer not-a-caller-key", "mj-api-secret": CALLER_KEYS["alice"]},
    ],
    ids=["bearer", "raw", "mj-api-secret", "upstream-key", "authorization-wins"],
)
def test_wrong_key_is_refused_and_nothing_reaches_an_upstream(
    http: httpx.Client,
    gateway: GatewayThread,
    session_sims: list[SimProcess],
    request_headers: dict[str, str],
) -> None:
    task_id = seeded_id(http, session_sims[0])
    before = upstream_total(http, session_sims)
    for response in (
        fetch(http, gateway, task_id, request_headers),
        submit(http, gateway, request_headers),
    ):
        body = assert_401_json(response)
        assert body["description"] == "unknown API key"
        for value in request_headers.values():
            assert value.split()[-1] not in response.text
    assert upstream_total(http, session_sims) == before
    # The same call with a good key does reach an upstream: the count above can move.
    assert fetch(http, gateway, task_id, caller("alice")).status_code == 200
    assert upstream_total(http, session_sims) > before


def test_missing_key_is_refused_with_json(
    http: httpx.Client, gateway: GatewayThread, session_sims: list[SimProcess]
) -> None:
    task_id = seeded_id(http, session_sims[0])
    before = upstream_total(http, session_sims)
    for request_headers in ({}, {"Authorization": ""}, {"Authorization": "midjourney-proxy"}):
        body = assert_401_json(fetch(http, gateway, task_id, request_headers))
        assert "missing" in body["description"]
        assert_401_json(submit(http, gateway, request_headers))
    assert upstream_total(http, session_sims) == before


@pytest.mark.parametrize(("name", "values"), TWICE)
def test_ambiguous_credentials_get_400_json_and_reach_no_upstream(
    http: httpx.Client,
    gateway: GatewayThread,
    session_sims: list[SimProcess],
    name: str,
    values: tuple[str, str],
) -> None:
    task_id = seeded_id(http, session_sims[0])
    good = CALLER_KEYS["alice"]
    pairs = [(name, value.replace(KEY, good)) for value in values]
    before = upstream_total(http, session_sims)
    answers = [
        http.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=pairs),
        http.post(f"{gateway.url}/mj/submit/imagine", json={"prompt": "x"}, headers=pairs),
    ]
    for answer in answers:
        assert answer.status_code == 400
        body = answer.json()
        assert body["description"] == f"the {name} header is given twice: send one key, once"
        assert body["result"] is None
        assert body["request_id"] == answer.headers["x-request-id"]
        assert good not in answer.text
    assert upstream_total(http, session_sims) == before
    # One of each is no ambiguity: Authorization wins, as documented.
    one_each = [("Authorization", f"Bearer {good}"), ("mj-api-secret", "not-a-caller-key")]
    answer = http.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=one_each)
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "request_headers",
    [
        {"Authorization": "midjourney-proxy", "mj-api-secret": CALLER_KEYS["alice"]},
        {"Authorization": "", "mj-api-secret": CALLER_KEYS["alice"]},
        {"Authorization": "Bearer", "mj-api-secret": CALLER_KEYS["alice"]},
        {"Authorization": f"Bearer {CALLER_KEYS['alice']}", "mj-api-secret": "wrong-key"},
        {"Authorization": f"BEARER {CALLER_KEYS['alice']}"},
    ],
    ids=["placeholder", "empty", "bearer-alone", "authorization-wins", "upper-case-bearer"],
)
def test_precedence_through_the_gateway(
    http: httpx.Client,
    gateway: GatewayThread,
    session_sims: list[SimProcess],
    request_headers: dict[str, str],
) -> None:
    task_id = seeded_id(http, session_sims[0])
    response = fetch(http, gateway, task_id, request_headers)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == task_id


def test_caller_credentials_never_go_upstream(
    http: httpx.Client, gateway: GatewayThread, sims: list[SimProcess]
) -> None:
    task_id = seeded_id(http, sims[0])
    sent = {"Authorization": f"Bearer {CALLER_KEYS['alice']}", "mj-api-secret": "stray-value-1"}
    assert fetch(http, gateway, task_id, sent).status_code == 200
    assert submit(http, gateway, sent).status_code == 200
    seen = 0
    for sim in sims:
        for recorded in stats(http, sim)["headers"]:
            seen += 1
            assert CALLER_KEYS["alice"] not in repr(recorded)
            assert "stray-value-1" not in repr(recorded)
            if sim.gateway_auth == "bearer":
                assert recorded["authorization"] == f"Bearer {sim.key}"
                assert "mj-api-secret" not in recorded
            else:
                assert recorded["mj-api-secret"] == sim.key
                assert "authorization" not in recorded
    assert seen >= 2, "the fetch and the submit reached no upstream"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_paths_need_no_key(http: httpx.Client, gateway: GatewayThread, path: str) -> None:
    response = http.get(f"{gateway.url}{path}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")


def test_anonymous_access_when_allowed(http: httpx.Client, sims: list[SimProcess]) -> None:
    task_id = seeded_id(http, sims[0])
    with running_gateway(make_config(sims, allow_anonymous=True)) as running:
        assert fetch(http, running, task_id, {}).status_code == 200
        assert_401_json(fetch(http, running, task_id, {"mj-api-secret": "not-a-caller-key"}))


def test_a_key_is_rotated_without_refusing_the_client(
    http: httpx.Client, sims: list[SimProcess]
) -> None:
    """The rotation the README describes: add the new key beside the old, move callers over,
    then remove the old key."""
    old, new = "rotation-old-key-8d1e", "rotation-new-key-4b7f"
    task_id = seeded_id(http, sims[0])
    both = make_config(sims, clients=[{"name": "alice", "key": old, "keys": [new]}])
    with running_gateway(both) as running:
        for key in (old, new):
            assert fetch(http, running, task_id, {"mj-api-secret": key}).status_code == 200
    only_new = make_config(sims, clients=[{"name": "alice", "keys": [new]}])
    with running_gateway(only_new) as running:
        assert fetch(http, running, task_id, {"mj-api-secret": new}).status_code == 200
        assert_401_json(fetch(http, running, task_id, {"mj-api-secret": old}))
