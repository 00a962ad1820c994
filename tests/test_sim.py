"""The simulated midjourney-proxy upstream (``mjgate sim``)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.sim import SimSettings, add_sim_arguments, create_sim_app, settings_from_args

KEY = "sim-key-123"
SECRET = {"mj-api-secret": KEY}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
IMAGE_URL = re.compile(
    r"^https://cdn\.discordapp\.com/attachments/\d+/\d+/[\w-]+\.png"
    r"\?ex=(?P<ex>[0-9a-f]{8})&is=(?P<is>[0-9a-f]{8})&hm=[0-9a-f]{64}&$"
)


def sim(**settings: Any) -> TestClient:
    settings.setdefault("failure_rate", 0.0)
    return TestClient(create_sim_app(SimSettings(**settings)))


def seed(client: TestClient, **task: Any) -> dict[str, Any]:
    response = client.post("/_sim/tasks", json=task)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def submit(client: TestClient, path: str, body: Any, **headers: str) -> dict[str, Any]:
    response = client.post(f"/mj/submit/{path}", json=body, headers=headers or SECRET)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert set(answer) == {"code", "description", "result", "properties"}
    return answer


def fetch(client: TestClient, task_id: str, prefix: str = "/mj") -> dict[str, Any]:
    response = client.get(f"{prefix}/task/{task_id}/fetch", headers=SECRET)
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def stats(client: TestClient) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/_sim/stats").json()
    return body


# -- not found ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "override", "status", "body"),
    [
        ("java", None, 200, b""),
        ("csharp", None, 204, b""),
        ("relay", None, 400, b'{"code":4,"description":"task_no_found","result":null}'),
        ("java", "null", 200, b"null"),
        ("relay", "404", 404, b'{"code":3,"description":"task not found"}'),
        ("csharp", "empty", 200, b""),
        ("java", "204", 204, b""),
    ],
)
def test_unknown_task_answers_in_the_flavors_not_found_style(
    flavor: str, override: str | None, status: int, body: bytes
) -> None:
    client = sim(flavor=flavor, not_found=override)
    for method, path in [
        ("GET", "/mj/task/1700000000000123/fetch"),
        ("GET", "/mj/task/1700000000000123/image-seed"),
        ("POST", "/mj/task/1700000000000123/cancel"),
    ]:
        response = client.request(method, path)
        assert (response.status_code, response.content) == (status, body), path


# -- auth --------------------------------------------------------------------------------------


def _status(client: TestClient, headers: dict[str, str]) -> int:
    status: int = client.get("/mj/task/list", headers=headers).status_code
    return status


def test_java_auth_wants_mj_api_secret_and_refuses_with_an_empty_401() -> None:
    client = sim(flavor="java", key=KEY)
    assert _status(client, SECRET) == 200
    refused = client.get("/mj/task/list", headers={"mj-api-secret": "wrong"})
    assert (refused.status_code, refused.content) == (401, b"")
    assert _status(client, {}) == 401
    assert _status(client, {"Authorization": f"Bearer {KEY}"}) == 401


def test_csharp_auth_reads_authorization_raw_before_mj_api_secret() -> None:
    client = sim(flavor="csharp", key=KEY)
    assert _status(client, {"Authorization": KEY}) == 200
    assert _status(client, SECRET) == 200
    refused = client.get("/mj/task/list", headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 401
    body = refused.json()
    assert body["success"] is False and body["code"] == -1 and body["message"] == "unauthorized"
    assert isinstance(body["timestamp"], int)
    # Authorization wins even when mj-api-secret is right: a stray header breaks the call.
    assert _status(client, {"Authorization": "midjourney-proxy", **SECRET}) == 401


def test_bearer_auth_wants_a_bearer_token_in_any_case() -> None:
    client = sim(flavor="relay", key=KEY)
    assert _status(client, {"Authorization": f"Bearer {KEY}"}) == 200
    assert _status(client, {"Authorization": f"bearer {KEY}"}) == 200
    assert _status(client, SECRET) == 401
    refused = client.get("/mj/task/list", headers={"Authorization": KEY})
    assert refused.status_code == 401
    assert refused.json() == {"error": {"message": "invalid token", "type": "auth_error"}}


def test_auth_style_override_and_no_key_means_no_check() -> None:
    client = sim(flavor="java", key=KEY, auth="bearer")
    assert _status(client, {"Authorization": f"Bearer {KEY}"}) == 200
    assert _status(client, SECRET) == 401
    assert _status(sim(flavor="relay"), {}) == 200
    assert _status(sim(flavor="java", key=""), {}) == 200


def test_control_api_needs_no_auth() -> None:
    client = sim(key=KEY)
    assert client.get("/_sim/stats").status_code == 200
    assert client.get("/_sim/health").json()["auth"] == "mj-api-secret"


# -- task life ---------------------------------------------------------------------------------


def test_a_task_plays_its_life_and_ends_success_with_a_signed_image() -> None:
    client = sim(task_seconds=0.5, image_ttl_s=3600)
    answer = submit(client, "imagine", {"prompt": "a red pig --v 6.1", "state": "mine"})
    assert (answer["code"], answer["description"]) == (1, "Submit success")
    task_id = answer["result"]
    assert re.fullmatch(r"\d{16}", task_id)
    assert abs(int(task_id[:13]) - time.time() * 1000) < 5000

    seen: list[str] = []
    progress: list[int] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        task = fetch(client, task_id)
        if not seen or seen[-1] != task["status"]:
            seen.append(task["status"])
        if task["status"] == "IN_PROGRESS":
            progress.append(int(task["progress"].rstrip("%")))
            assert task["startTime"] >= task["submitTime"] and task["finishTime"] is None
        if task["status"] == "SUCCESS":
            break
        time.sleep(0.02)
    assert seen[-1] == "SUCCESS" and "IN_PROGRESS" in seen
    order = ["NOT_START", "SUBMITTED", "IN_PROGRESS", "SUCCESS"]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    assert progress == sorted(progress) and max(progress) <= 99

    assert task["progress"] == "100%" and task["prompt"] == "a red pig --v 6.1"
    assert task["state"] == "mine" and task["botType"] == "MID_JOURNEY"
    assert task["submitTime"] <= task["startTime"] <= task["finishTime"]
    assert task["finishTime"] - task["submitTime"] == pytest.approx(500, abs=5)
    match = IMAGE_URL.match(task["imageUrl"])
    assert match, task["imageUrl"]
    assert int(match["ex"], 16) == task["finishTime"] // 1000 + 3600
    assert int(match["is"], 16) == task["finishTime"] // 1000
    labels = [button["label"] for button in task["buttons"]]
    assert labels == ["U1", "U2", "U3", "U4", "", "V1", "V2", "V3", "V4"]
    assert re.fullmatch(rf"MJ::JOB::upsample::1::{UUID}", task["buttons"][0]["customId"])
    assert all(b["type"] == 2 and b["style"] == 2 for b in task["buttons"])
    assert task["properties"]["finalPrompt"] == "a red pig --v 6.1"
    time.sleep(0.05)
    assert fetch(client, task_id) == task  # terminal tasks never change


def test_failure_rate_one_ends_every_task_in_failure() -> None:
    client = sim(task_seconds=0.0, failure_rate=1.0)
    task_id = submit(client, "imagine", {"prompt": "cat"})["result"]
    task = fetch(client, task_id)
    assert task["status"] == "FAILURE" and task["failReason"] and task["imageUrl"] == ""
    assert task["finishTime"] >= task["submitTime"]
    assert client.post(f"/mj/task/{task_id}/cancel").json()["code"] == 4


def test_the_same_seed_draws_the_same_outcomes() -> None:
    def outcomes() -> list[str]:
        client = sim(task_seconds=0.0, failure_rate=0.5, seed=42)
        ids = [submit(client, "imagine", {"prompt": f"p{n}"})["result"] for n in range(20)]
        return [fetch(client, task_id)["status"] for task_id in ids]

    first = outcomes()
    assert first == outcomes()
    assert {"SUCCESS", "FAILURE"} == set(first)


# -- submit codes ------------------------------------------------------------------------------


def test_custom_zoom_waits_in_modal_until_the_modal_call() -> None:
    client = sim(task_seconds=0.1)
    parent = seed(client, id="1700000000000001", prompt="a castle")
    zoom = next(b["customId"] for b in parent["buttons"] if b["label"] == "U1")
    upscaled = submit(client, "action", {"taskId": parent["id"], "customId": zoom})
    assert upscaled["code"] == 1
    custom = f"MJ::CustomZoom::{parent['properties'].get('messageHash', 'x')}"
    answer = submit(client, "action", {"taskId": parent["id"], "customId": custom})
    assert answer["code"] == 21 and answer["result"]
    modal_id = answer["result"]
    time.sleep(0.15)
    assert fetch(client, modal_id)["status"] == "MODAL"
    assert submit(client, "modal", {"taskId": parent["id"]})["code"] == 4  # not MODAL
    moved = submit(client, "modal", {"taskId": modal_id, "prompt": "a castle --zoom 2"})
    assert (moved["code"], moved["result"]) == (1, modal_id)
    assert fetch(client, modal_id)["status"] in {"NOT_START", "SUBMITTED", "IN_PROGRESS"}
    time.sleep(0.15)
    task = fetch(client, modal_id)
    assert task["status"] == "SUCCESS" and task["action"] == "ZOOM"
    assert task["prompt"] == "a castle --zoom 2"
    assert task["properties"]["parentTaskId"] == parent["id"]


def test_more_than_three_running_tasks_answer_in_queue() -> None:
    client = sim(task_seconds=60)
    codes = [submit(client, "imagine", {"prompt": f"p{n}"}) for n in range(6)]
    assert [a["code"] for a in codes] == [1, 1, 1, 1, 22, 22]
    assert all(a["result"] for a in codes)
    assert codes[5]["properties"]["numberOfQueues"] == 2
    assert fetch(client, codes[5]["result"])["status"] == "NOT_START"


@pytest.mark.parametrize(
    ("flavor", "code", "description"),
    [
        ("java", 23, "队列已满\uff0c请稍后尝试"),
        ("relay", 23, "队列已满\uff0c请稍后尝试"),
        ("csharp", 9, "queue is full, please try again later"),
    ],
)
def test_queue_full(flavor: str, code: int, description: str) -> None:
    client = sim(flavor=flavor, queue_full_rate=1.0)
    answer = submit(client, "imagine", {"prompt": "cat"})
    assert (answer["code"], answer["description"], answer["result"]) == (code, description, None)
    assert client.get("/mj/task/list").json() == []


def test_banned_prompt_is_refused_with_code_24() -> None:
    client = sim()
    answer = submit(client, "imagine", {"prompt": "a Banned cat"})
    assert answer["code"] == 24 and answer["result"] is None
    assert answer["properties"] == {"bannedWord": "banned", "promptEn": "a Banned cat"}
    assert submit(client, "imagine", {"prompt": "unbannedness"})["code"] == 1


def test_validation_and_unknown_parent_codes() -> None:
    client = sim(task_seconds=60)
    running = submit(client, "imagine", {"prompt": "cat"})["result"]
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("imagine", {}, 4),
        ("imagine", {"prompt": "  "}, 4),
        ("action", {"customId": "MJ::JOB::upsample::1::x"}, 4),
        ("action", {"taskId": "1700000000000999", "customId": "MJ::JOB::upsample::1::x"}, 3),
        ("action", {"taskId": running, "customId": "MJ::JOB::upsample::1::x"}, 4),
        ("modal", {"prompt": "x"}, 4),
        ("modal", {"taskId": "1700000000000999"}, 3),
        ("change", {"action": "UPSCALE", "index": 1}, 4),
        ("change", {"taskId": "1700000000000999", "action": "UPSCALE", "index": 1}, 3),
        ("simple-change", {"content": "1700000000000999 U1"}, 3),
        ("simple-change", {"content": "nonsense"}, 4),
        ("blend", {"base64Array": ["a"]}, 4),
        ("describe", {}, 4),
        ("shorten", {}, 4),
        ("show", {}, 4),
    ]
    for path, body, code in cases:
        assert submit(client, path, body)["code"] == code, (path, body)
    swap = client.post("/mj/insight-face/swap", json={"sourceBase64": "a"})
    assert swap.json()["code"] == 4


def test_every_submit_route_accepts_good_input() -> None:
    client = sim(task_seconds=0)
    bodies: dict[str, dict[str, Any]] = {
        "imagine": {"prompt": "cat"},
        "blend": {"base64Array": ["a", "b"]},
        "describe": {"base64": "data:image/png;base64,AAAA"},
        "shorten": {"prompt": "a very long prompt"},
        "show": {"jobId": "abc"},
        "edits": {"prompt": "make it blue", "image": "x"},
        "video": {"prompt": "a moving cat"},
    }
    for path, body in bodies.items():
        assert submit(client, path, body)["code"] == 1, path
    swap = client.post("/mj/insight-face/swap", json={"sourceBase64": "a", "targetBase64": "b"})
    assert swap.json()["code"] == 1
    uploaded = submit(client, "upload-discord-images", {"base64Array": ["a", "b"]})
    assert uploaded["code"] == 1 and len(uploaded["result"]) == 2


def test_follow_ups_record_their_parent() -> None:
    client = sim(task_seconds=60)
    parent = seed(client, id="1700000000000001", prompt="a fox")
    v2 = parent["buttons"][6]["customId"]
    answers = {
        "action": submit(client, "action", {"taskId": parent["id"], "customId": v2}),
        "change": submit(
            client, "change", {"taskId": parent["id"], "action": "UPSCALE", "index": 3}
        ),
        "reroll": submit(client, "change", {"taskId": parent["id"], "action": "REROLL"}),
        "simple": submit(client, "simple-change", {"content": f"{parent['id']} v4"}),
    }
    tasks = {name: fetch(client, answer["result"]) for name, answer in answers.items()}
    assert all(t["properties"]["parentTaskId"] == parent["id"] for t in tasks.values())
    assert all(t["prompt"] == "a fox" for t in tasks.values())
    assert (tasks["action"]["action"], tasks["action"]["customId"]) == ("VARIATION", v2)
    assert (
        tasks["change"]["action"] == "UPSCALE" and "::upsample::3::" in tasks["change"]["customId"]
    )
    assert tasks["reroll"]["action"] == "REROLL"
    assert (
        tasks["simple"]["action"] == "VARIATION"
        and "::variation::4::" in (tasks["simple"]["customId"])
    )
    bad = submit(client, "change", {"taskId": parent["id"], "action": "UPSCALE", "index": 5})
    assert bad["code"] == 4


# -- lookups -----------------------------------------------------------------------------------


def _ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [task["id"] for task in response.json()]


def test_list_lookups_drop_unknown_and_duplicates_in_a_scrambled_order() -> None:
    client = sim()
    for task_id in ("1700000000000001", "1700000000000002", "1700000000000003"):
        seed(client, id=task_id)
    for path in ("list-by-ids", "list-by-condition"):
        asked = ["1700000000000002", "nope", "1700000000000001", "1700000000000002"]
        got = _ids(client.post(f"/mj/task/{path}", json={"ids": [*asked, "1700000000000003"]}))
        assert sorted(got) == ["1700000000000001", "1700000000000002", "1700000000000003"]
        for order in (
            ["1700000000000001", "1700000000000002", "1700000000000003"],
            ["1700000000000003", "1700000000000002", "1700000000000001"],
            ["1700000000000002", "1700000000000003"],
        ):
            got = _ids(client.post(f"/mj/task/{path}", json={"ids": order}))
            assert sorted(got) == sorted(order) and got != order
    assert client.post("/mj/task/list-by-ids", json={}).json() == []


@pytest.mark.parametrize(
    ("list_paths", "served", "refused"),
    [
        ("list-by-ids", "list-by-ids", "list-by-condition"),
        ("list-by-condition", "list-by-condition", "list-by-ids"),
    ],
)
def test_only_the_configured_list_spelling_is_served(
    list_paths: str, served: str, refused: str
) -> None:
    client = sim(list_paths=list_paths)
    seed(client, id="1700000000000001")
    assert _ids(client.post(f"/mj/task/{served}", json={"ids": ["1700000000000001"]})) == [
        "1700000000000001"
    ]
    assert client.post(f"/mj/task/{refused}", json={"ids": ["1700000000000001"]}).status_code == 404
    assert stats(client)["requests"][f"POST /mj/task/{refused}"] == 1


def _seed_query_set(client: TestClient) -> None:
    rows = [
        ("1700000000000001", 1000, "SUCCESS", "IMAGINE", "a red cat"),
        ("1700000000000002", 3000, "FAILURE", "IMAGINE", "a blue dog"),
        ("1700000000000003", 2000, "SUCCESS", "UPSCALE", "a red dog"),
        ("1700000000000004", 2000, "IN_PROGRESS", "VARIATION", "a green cat"),
        ("1700000000000005", 5000, "SUCCESS", "IMAGINE", "RED fox"),
    ]
    for task_id, submitted, status, action, prompt in rows:
        seed(
            client,
            id=task_id,
            submitTime=submitted,
            finishTime=submitted + 500,
            status=status,
            action=action,
            prompt=prompt,
        )


def _query(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/mj/task/query", json=body)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def test_query_pages_sorts_and_filters_like_spring() -> None:
    client = sim()
    _seed_query_set(client)
    page = _query(client)
    # submitTime desc, ties broken by id in the same direction
    assert [t["id"][-1] for t in page["content"]] == ["5", "2", "4", "3", "1"]
    sort = {"empty": False, "sorted": True, "unsorted": False}
    assert {k: v for k, v in page.items() if k != "content"} == {
        "pageable": {
            "sort": sort,
            "offset": 0,
            "pageNumber": 0,
            "pageSize": 10,
            "paged": True,
            "unpaged": False,
        },
        "last": True,
        "totalPages": 1,
        "totalElements": 5,
        "size": 10,
        "number": 0,
        "sort": sort,
        "first": True,
        "numberOfElements": 5,
        "empty": False,
    }
    page = _query(client, pageNumber=1, pageSize=2, sort="id,asc")
    assert [t["id"][-1] for t in page["content"]] == ["3", "4"]
    assert (page["totalPages"], page["first"], page["last"], page["pageable"]["offset"]) == (
        3,
        False,
        False,
        2,
    )
    assert _query(client, pageNumber=2, pageSize=2)["last"] is True
    asc = _query(client, sort="submitTime,asc")["content"]
    assert [t["id"][-1] for t in asc] == ["1", "3", "4", "2", "5"]  # ties broken by id

    def ids(**body: Any) -> list[str]:
        return [t["id"][-1] for t in _query(client, sort="id,asc", **body)["content"]]

    assert ids(status="SUCCESS") == ["1", "3", "5"]
    assert ids(statusSet=["FAILURE", "IN_PROGRESS"]) == ["2", "4"]
    assert ids(action="IMAGINE", prompt="red") == ["1", "5"]
    assert ids(ids=["1700000000000004", "1700000000000002", "x"]) == ["2", "4"]
    assert ids(id="1700000000000003") == ["3"]
    assert ids(prompt="", status="", statusSet=[]) == ["1", "2", "3", "4", "5"]
    empty = _query(client, status="CANCEL")
    assert (empty["content"], empty["totalPages"], empty["empty"], empty["last"]) == (
        [],
        0,
        True,
        True,
    )


def test_query_is_404_when_not_supported() -> None:
    assert sim(supports_query=False).post("/mj/task/query", json={}).status_code == 404


def test_list_gives_the_newest_hundred_and_queue_the_unfinished() -> None:
    client = sim(task_seconds=60)
    for n in range(105):
        seed(client, id=f"17000000000{n:05d}", submitTime=1_700_000_000_000 + n)
    listed = _ids(client.get("/mj/task/list"))
    assert len(listed) == 100 and listed[0] == "1700000000000104" and listed[-1].endswith("05")
    playing = submit(client, "imagine", {"prompt": "cat"})["result"]
    waiting = seed(client, id="1800000000000001", status="NOT_START")["id"]
    assert sorted(_ids(client.get("/mj/task/queue"))) == sorted([playing, waiting])
    assert _ids(client.get("/mj/task/list"))[0] == waiting  # newest submitTime


def test_image_seed_writes_the_seed_into_a_success_task() -> None:
    client = sim(task_seconds=60)
    task_id = seed(client, id="1700000000000001")["id"]
    answer = client.get(f"/mj/task/{task_id}/image-seed").json()
    assert answer["code"] == 1 and answer["result"].isdigit()
    task = fetch(client, task_id)
    assert task["seed"] == answer["result"] == task["properties"]["seed"]
    assert client.get(f"/mj/task/{task_id}/image-seed").json()["result"] == answer["result"]
    running = submit(client, "imagine", {"prompt": "cat"})["result"]
    assert client.get(f"/mj/task/{running}/image-seed").json()["code"] == 4


def test_cancel_ends_a_running_task_but_not_a_finished_one() -> None:
    client = sim(task_seconds=60)
    running = submit(client, "imagine", {"prompt": "cat"})["result"]
    answer = client.post(f"/mj/task/{running}/cancel").json()
    assert answer["code"] == 1
    task = fetch(client, running)
    assert task["status"] == "CANCEL" and task["finishTime"] >= task["submitTime"]
    assert client.post(f"/mj/task/{running}/cancel").json()["code"] == 4
    done = seed(client, id="1700000000000001")["id"]
    assert client.post(f"/mj/task/{done}/cancel").json() == {
        "code": 4,
        "description": "task already finished",
        "result": None,
        "properties": {},
    }
    assert client.get("/mj/task/queue").json() == []


def test_speed_prefixes_mirror_every_route_and_are_counted() -> None:
    client = sim(key=KEY)
    answer = client.post("/mj-fast/submit/imagine", json={"prompt": "cat"}, headers=SECRET)
    task_id = answer.json()["result"]
    assert fetch(client, task_id, "/mj-relax")["id"] == task_id
    assert fetch(client, task_id, "/mj-fast/mj")["id"] == task_id
    listed = client.post(
        "/mj-turbo/task/list-by-condition", json={"ids": [task_id]}, headers=SECRET
    )
    assert _ids(listed) == [task_id]
    assert client.get(f"/mj-turbo/task/{task_id}/fetch").status_code == 401
    counted = stats(client)
    assert counted["requests"] == {
        "POST /mj-fast/submit/imagine": 1,
        "GET /mj-relax/task/{id}/fetch": 1,
        "GET /mj-fast/mj/task/{id}/fetch": 1,
        "POST /mj-turbo/task/list-by-condition": 1,
        "GET /mj-turbo/task/{id}/fetch": 1,
    }
    assert counted["prefixes"] == {"/mj-fast": 1, "/mj-relax": 1, "/mj-fast/mj": 1, "/mj-turbo": 2}


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["java", "csharp", "relay"])
def test_error_rate_one_answers_500_in_the_flavors_style(flavor: str) -> None:
    client = sim(flavor=flavor, error_rate=1.0)
    response = client.get("/mj/task/list")
    assert response.status_code == 500
    if flavor == "java":
        assert response.text == "Internal Server Error"
    elif flavor == "csharp":
        assert response.json()["success"] is False and response.json()["code"] == -1
    else:
        assert response.json()["code"] == 9
    assert client.get("/_sim/stats").status_code == 200  # control API is never faulted
    assert stats(client)["requests"] == {"GET /mj/task/list": 1}


def test_latency_and_hangs_delay_the_answer() -> None:
    client = sim(latency_ms=100)
    started = time.monotonic()
    assert client.get("/mj/task/list").status_code == 200
    assert time.monotonic() - started >= 0.1
    client = sim(timeout_rate=1.0, hang_s=0.2)
    started = time.monotonic()
    assert client.get("/mj/task/list").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_faults_change_at_run_time() -> None:
    client = sim()
    changed = client.post("/_sim/faults", json={"error_rate": 1, "task_seconds": 0.5}).json()
    assert changed["error_rate"] == 1 and changed["task_seconds"] == 0.5
    assert set(changed) == {
        "latency_ms",
        "error_rate",
        "error_status",
        "timeout_rate",
        "hang_s",
        "queue_full_rate",
        "failure_rate",
        "task_seconds",
        "echo_key",
    }
    assert client.get("/mj/task/list").status_code == 500
    client.post("/_sim/faults", json={"error_rate": 0, "queue_full_rate": 1})
    assert submit(client, "imagine", {"prompt": "cat"})["code"] == 23
    assert client.get("/_sim/faults").json()["queue_full_rate"] == 1
    assert client.post("/_sim/faults", json={"error_rate": 2}).status_code == 400
    assert client.post("/_sim/faults", json={"flavor": "csharp"}).status_code == 400


def test_a_body_that_is_not_json_is_a_400() -> None:
    response = sim(flavor="relay").post("/mj/submit/imagine", content=b"{nope")
    assert response.status_code == 400 and response.json()["code"] == 4


# -- stats and control -------------------------------------------------------------------------


def test_stats_count_requests_submits_and_record_headers_and_paths() -> None:
    client = sim(key=KEY)
    client.get("/mj/task/1700000000000001/fetch", headers={**SECRET, "X-Request-Id": "abc"})
    client.get("/mj/task/1700000000000002/fetch?x=1")  # refused by auth, still counted
    submit(client, "imagine", {"prompt": "cat"})
    submit(client, "imagine", {"prompt": "a banned cat"})
    client.post("/mj/submit/imagine", json={"prompt": "cat"})  # 401: not a submit
    counted = stats(client)
    assert counted["requests"] == {"GET /mj/task/{id}/fetch": 2, "POST /mj/submit/imagine": 3}
    assert (counted["total"], counted["submits"], counted["inflight"]) == (5, 2, 0)
    assert counted["max_inflight"] >= 1
    assert sum(counted["per_second"].values()) == 5
    assert all(abs(int(s) - time.time()) < 120 for s in counted["per_second"])
    assert counted["headers"][0]["x-request-id"] == "abc"
    assert counted["headers"][0]["mj-api-secret"] == KEY
    assert "mj-api-secret" not in counted["headers"][1]
    assert counted["paths"][:2] == [
        "/mj/task/1700000000000001/fetch",
        "/mj/task/1700000000000002/fetch?x=1",
    ]
    for n in range(205):
        client.get(f"/mj/task/{n}/fetch", headers=SECRET)
    counted = stats(client)
    assert len(counted["headers"]) == len(counted["paths"]) == 200
    assert counted["paths"][-1] == "/mj/task/204/fetch"


def test_reset_clears_stats_and_optionally_tasks() -> None:
    client = sim()
    task_id = submit(client, "imagine", {"prompt": "cat"})["result"]
    assert client.post("/_sim/reset").status_code == 200
    assert stats(client)["total"] == 0 and stats(client)["requests"] == {}
    assert client.get(f"/_sim/tasks/{task_id}").status_code == 200
    client.post("/_sim/reset", json={"tasks": True})
    assert client.get(f"/_sim/tasks/{task_id}").status_code == 404


def test_seeded_tasks_are_stored_as_given_and_do_not_progress() -> None:
    client = sim(task_seconds=0.05)
    url = "https://cdn.discordapp.com/attachments/1/2/x.png?ex=6728831f&is=6727319f&hm=ab&"
    seeded = seed(
        client,
        id="1730621826053455",
        imageUrl=url,
        finishTime=1730621855817,
        mode="RELAX",
        imageUrls=[{"url": url}],
        properties={"finalPrompt": "pig", "custom": 1},
    )
    assert seeded["imageUrl"] == url and seeded["mode"] == "RELAX"
    assert seeded["imageUrls"] == [{"url": url}] and seeded["properties"]["custom"] == 1
    assert (seeded["status"], seeded["progress"], seeded["botType"]) == (
        "SUCCESS",
        "100%",
        "MID_JOURNEY",
    )
    assert seeded["submitTime"] < seeded["finishTime"] == 1730621855817
    assert fetch(client, "1730621826053455") == seeded

    generated = seed(client, id="1730621826053456", finishTime=1730621855817)
    match = IMAGE_URL.match(generated["imageUrl"])
    assert match and int(match["ex"], 16) == 1730621855 + 86400
    assert len(generated["buttons"]) == 9

    frozen = seed(client, id="1730621826053457", status="IN_PROGRESS", progress="42%")
    time.sleep(0.1)
    assert fetch(client, frozen["id"])["progress"] == "42%"
    assert client.get(f"/_sim/tasks/{frozen['id']}").json() == frozen
    assert client.get("/_sim/tasks/nope").status_code == 404
    assert client.post("/_sim/tasks", json={"status": "SUCCESS"}).status_code == 400


def test_a_seeded_task_can_play_its_life_instead() -> None:
    client = sim(task_seconds=60)
    playing = seed(client, playing=True, id="1700000000000042", prompt="owl", task_seconds=0.05)
    assert playing["status"] == "NOT_START" and playing["id"] == "1700000000000042"
    failing = seed(client, playing=True, prompt="owl", outcome="FAILURE", task_seconds=0.05)
    time.sleep(0.08)
    assert fetch(client, playing["id"])["status"] == "SUCCESS"
    assert fetch(client, failing["id"])["status"] == "FAILURE"


# -- settings and CLI --------------------------------------------------------------------------


def test_cli_flags_build_the_settings() -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 8090)
    assert settings_from_args(args) == SimSettings()
    flags = (
        "--flavor csharp --key K --auth bearer --not-found null --list-paths list-by-ids "
        "--no-query --task-seconds 2 --failure-rate 0.5 --image-ttl-s 60 --latency-ms 5 "
        "--error-rate 0.1 --timeout-rate 0.2 --hang-s 3 --queue-full-rate 0.3 --seed 9"
    )
    args = parser.parse_args(flags.split(" "))
    assert settings_from_args(args) == SimSettings(
        flavor="csharp",
        key="K",
        auth="bearer",
        not_found="null",
        list_paths="list-by-ids",
        supports_query=False,
        task_seconds=2.0,
        failure_rate=0.5,
        image_ttl_s=60,
        latency_ms=5.0,
        error_rate=0.1,
        timeout_rate=0.2,
        hang_s=3.0,
        queue_full_rate=0.3,
        seed=9,
    )
    with pytest.raises(ValueError):
        SimSettings(failure_rate=2)


def test_run_sim_prints_where_it_listens_and_serves() -> None:
    code = (
        "import argparse\n"
        "from gateway.sim import add_sim_arguments, run_sim\n"
        "p = argparse.ArgumentParser(); add_sim_arguments(p)\n"
        "run_sim(p.parse_args(['--port', '0', '--flavor', 'relay']))\n"
    )
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = re.fullmatch(r"mjgate sim \(relay\) listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        response = httpx.get(f"{match[1]}/mj/task/1700000000000001/fetch")
        assert response.status_code == 400 and b"task_no_found" in response.content
    finally:
        process.terminate()
        process.wait(timeout=10)
