"""Task semantics: the id rule, every upstream flavor of "not found", and parsing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.protocol import STATUSES, TERMINAL
from gateway.tasks import (
    is_not_found,
    parse_task,
    parse_task_list,
    valid_task_id,
)

# A real task body as a relay returns it (DESIGN.md seeds), with fields mjgate does not know.
TASK = {
    "id": "1730000000000123",
    "action": "IMAGINE",
    "status": "SUCCESS",
    "progress": "100%",
    "prompt": "a cat",
    "imageUrl": "https://cdn.discordapp.com/attachments/1/2/a.png?ex=6790a0b0&is=678f4f30&hm=ab&",
    "buttons": [{"customId": "MJ::JOB::upsample::1::x", "label": "U1"}],
    "properties": {"finalPrompt": "a cat"},
    "mode": "FAST",
}


# --- states --------------------------------------------------------------------------------


def test_terminal_states() -> None:
    assert {"SUCCESS", "FAILURE", "CANCEL"} == TERMINAL
    assert "MODAL" not in TERMINAL  # can wait forever for a modal call
    assert TERMINAL < STATUSES
    expected = {"NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "FAILURE", "SUCCESS", "CANCEL"}
    assert expected == STATUSES


# --- the id rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task_id", ["1", "1730000000000123", "a" * 64, "A-z_0-9", "-", "_", "x" * 63]
)
def test_valid_task_ids(task_id: str) -> None:
    assert valid_task_id(task_id)


@pytest.mark.parametrize(
    "task_id",
    [
        "",
        "a" * 65,
        "12/34",
        "../etc",
        "12 34",
        "1234\n",
        "\n1234",
        "123.4",
        "123%2F4",
        "1234?x=1",
        "täsk",
        "\u0661\u0662\u0663",  # Arabic-Indic digits: Unicode digits, not ASCII
        "\uff54\uff41\uff53\uff4b",  # full-width letters
        "🙂",
    ],
)
def test_invalid_task_ids(task_id: str) -> None:
    assert not valid_task_id(task_id)


@pytest.mark.parametrize("value", [None, 1730000000000123, b"1234", ["1"], {"id": "1"}, True])
def test_non_strings_are_not_task_ids(value: object) -> None:
    assert not valid_task_id(value)


# --- not found, in every flavor --------------------------------------------------------------

RELAY_NOT_FOUND = orjson.dumps(
    {"code": 4, "description": "task_no_found", "result": None, "properties": None}
)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b""),  # Java
        (200, b"  \n"),
        (200, b"null"),
        (200, b"null\n"),
        (204, b""),  # C#
        (404, b""),
        (404, b"Not Found"),
        (404, b'{"error":"no such task"}'),
        (400, RELAY_NOT_FOUND),  # new-api relays
    ],
    ids=[
        "200-empty",
        "200-blank",
        "200-null",
        "200-null-newline",
        "204",
        "404-empty",
        "404-text",
        "404-json",
        "400-task_no_found",
    ],
)
def test_not_found_flavors(status: int, body: bytes) -> None:
    assert is_not_found(status, body)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, orjson.dumps(TASK)),
        (200, b"[]"),
        (200, orjson.dumps({"code": 1, "description": "ok", "result": "1730000000000123"})),
        (400, orjson.dumps({"code": 4, "description": "prompt must not be empty"})),
        (400, b""),
        (401, b""),
        (429, b""),
        (500, b""),
        (500, RELAY_NOT_FOUND),
        (502, b"null"),
        (503, b""),
    ],
    ids=[
        "200-task",
        "200-empty-list",
        "200-envelope",
        "400-other",
        "400-empty",
        "401",
        "429",
        "500",
        "500-task_no_found",
        "502-null",
        "503",
    ],
)
def test_answers_that_are_not_not_found(status: int, body: bytes) -> None:
    assert not is_not_found(status, body)


# --- parsing ---------------------------------------------------------------------------------


def test_parse_task_keeps_every_field() -> None:
    assert parse_task(orjson.dumps(TASK)) == TASK


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"not json",
        b"{",
        b"[]",
        orjson.dumps([TASK]),
        b'"1730000000000123"',
        orjson.dumps({"status": "SUCCESS"}),
        orjson.dumps({"id": ""}),
        orjson.dumps({"id": "a/b"}),
        orjson.dumps({"id": 1730000000000123}),
        orjson.dumps({"code": 3, "description": "not found"}),
    ],
)
def test_parse_task_refuses_what_is_not_a_task(body: bytes) -> None:
    assert parse_task(body) is None


def test_parse_task_list() -> None:
    other = {**TASK, "id": "1730000000000456", "status": "IN_PROGRESS"}
    assert parse_task_list(orjson.dumps([TASK, other])) == [TASK, other]


def test_parse_task_list_skips_ill_formed_entries() -> None:
    entries: list[Any] = [TASK, None, "x", 5, {"status": "SUCCESS"}, {"id": "bad id"}, [TASK]]
    assert parse_task_list(orjson.dumps(entries)) == [TASK]


@pytest.mark.parametrize("body", [b"[]", b"null", b" null "])
def test_parse_task_list_of_nothing(body: bytes) -> None:
    assert parse_task_list(body) == []


@pytest.mark.parametrize(
    "body", [b"", b"not json", orjson.dumps(TASK), b'"x"', b"3", orjson.dumps({"content": []})]
)
def test_parse_task_list_refuses_what_is_not_a_list(body: bytes) -> None:
    assert parse_task_list(body) is None
