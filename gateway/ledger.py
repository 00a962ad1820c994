"""The task ledger: every submit mjgate saw accepted, who made it, and what became of it.

A record per task (a hash in the store, ``ledger.retention_days``): id, upstream, caller and
team, action, parent task, mode prefix, submit time, a hash of the prompt (never the prompt),
and the status and finish time as lookups see them. Time indexes (sorted sets by submit
time) list all tasks, each caller's, each team's, and each upstream's unfinished ones; per-day
counters per caller, action and upstream answer usage questions without reading records.

A record turns final once in the whole fleet (a script in the store): that is when its
outcome is counted, its quota unit refunded after FAILURE (``refund_failed``), and it leaves
the unfinished index. A task unfinished ``ledger.stuck_after_s`` after its submit is stuck;
mjgate reports it and never invents a terminal status for it.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import math
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import structlog

from gateway.config import ClientConfig, Config
from gateway.errors import GatewayError, StoreError
from gateway.lru import LRU
from gateway.metrics import CALLER_SUBMITS, CALLER_TASKS_FINISHED, STUCK_TASKS
from gateway.owners import OwnerMap
from gateway.protocol import STATUSES, TERMINAL
from gateway.quota import Quotas
from gateway.store import KeySpace, RedisStore, Store

__all__ = [
    "GROUPS",
    "Ledger",
    "Submitted",
    "TaskPage",
    "TaskQuery",
    "UsageQuery",
    "action_of",
    "parse_day",
    "parse_time_ms",
    "read_usage",
    "usage_csv",
]

log = structlog.get_logger("mjgate.ledger")

GROUPS = ("day", "client", "action", "upstream")
OUTCOMES = {"SUCCESS": "succeeded", "FAILURE": "failed", "CANCEL": "cancelled"}
COUNTS = ("submitted", "succeeded", "failed", "cancelled")
DAY_MS = 86_400_000
_SEEN_ENTRIES = 10_000
_SCAN_BATCH = 200
_AFTER_EVERY_MEMBER = "~"  # sorts after every member: ids and upstream names are [A-Za-z0-9_-]
_CURSOR = re.compile(r"([0-9]{1,15})\.([a-z0-9_-]+/[A-Za-z0-9_-]+)")

# The action a submit route starts, as upstreams name it; a button (``customId``) decides
# for ``action``. Labels stay bounded: anything else is OTHER.
_ROUTE_ACTIONS = {
    "imagine": "IMAGINE",
    "blend": "BLEND",
    "describe": "DESCRIBE",
    "shorten": "SHORTEN",
    "edits": "EDIT",
    "video": "VIDEO",
    "show": "SHOW",
    "swap": "SWAP_FACE",
}
_BUTTON_ACTIONS = (
    ("upsample", "UPSCALE"),
    ("variation", "VARIATION"),
    ("reroll", "REROLL"),
    ("pan_", "PAN"),
    ("Outpaint", "ZOOM"),
    ("CustomZoom", "ZOOM"),
    ("Inpaint", "INPAINT"),
    ("PicRead", "IMAGINE"),
    ("PromptAnalyzer", "IMAGINE"),
)
_CHANGE_ACTIONS = {"U": "UPSCALE", "V": "VARIATION", "R": "REROLL"}


def action_of(kind: str, data: dict[str, Any]) -> str:
    """The action of a submit to ``/submit/{kind}`` with body ``data``."""
    if kind in _ROUTE_ACTIONS:
        return _ROUTE_ACTIONS[kind]
    if kind == "action":
        custom_id = str(data.get("customId") or "")
        return next((a for part, a in _BUTTON_ACTIONS if part in custom_id), "OTHER")
    if kind == "change":
        action = str(data.get("action") or "").upper()
        return action if action in _CHANGE_ACTIONS.values() else "OTHER"
    if kind == "simple-change":
        words = str(data.get("content") or "").split()
        return _CHANGE_ACTIONS.get(words[1][:1].upper(), "OTHER") if len(words) > 1 else "OTHER"
    return "OTHER"


def parse_day(text: str, what: str) -> date:
    """A UTC date from ``YYYY-MM-DD`` or an ISO-8601 time (its UTC day); else 400."""
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        return _parse_instant(text).astimezone(UTC).date()
    except (ValueError, OverflowError):
        raise GatewayError(400, f"{what} must be YYYY-MM-DD or an ISO-8601 time") from None


def parse_time_ms(text: str, what: str) -> int:
    """Epoch milliseconds from digits or an ISO-8601 time (UTC unless it says); else 400."""
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return int(_parse_instant(text).timestamp() * 1000)
    except (ValueError, OverflowError):
        raise GatewayError(400, f"{what} must be epoch ms or an ISO-8601 time") from None


def _parse_instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submit mjgate saw accepted, as the submit route knows it."""

    task_id: str
    upstream: str
    client: ClientConfig
    action: str
    parent: str | None
    mode: str
    code: int
    prompt: str | None
    quota_periods: tuple[str, ...]
    submit_ms: int


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: date
    end: date
    client: str | None = None
    group_by: tuple[str, ...] = ("client",)


@dataclass(frozen=True, slots=True)
class TaskQuery:
    client: str | None = None
    status: str | None = None
    action: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 100
    cursor: str | None = None
    stuck: bool = False


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[dict[str, Any]]
    next_cursor: str | None


class Ledger:
    """Writes and reads the ledger in the store."""

    def __init__(
        self,
        store: Store,
        keys: KeySpace,
        config: Config,
        owners: OwnerMap,
        quotas: Quotas,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.store = store
        self.keys = keys
        self.owners = owners
        self.quotas = quotas
        self._spawn = spawn
        self.retention_ms = int(config.ledger.retention_days * DAY_MS)
        self.stuck_after_ms = int(config.ledger.stuck_after_s * 1000)
        self.upstreams = tuple(u.name for u in config.upstreams)
        self._clients = {c.name: c for c in config.clients}
        # The status this worker last wrote per task: a poll that learns nothing new writes
        # nothing.
        self._seen: LRU[tuple[str, str], str] = LRU(_SEEN_ENTRIES)

    # -- writing ------------------------------------------------------------------------------

    async def record(self, submitted: Submitted) -> None:
        """Record an accepted submit; a store failure is logged, never the caller's problem."""
        s = submitted
        client = s.client
        status = "MODAL" if s.code == 21 else "SUBMITTED"
        day = _day_of(s.submit_ms)
        fields = {
            "id": s.task_id,
            "upstream": s.upstream,
            "client": client.name,
            "team": client.team,
            "action": s.action,
            "parent": s.parent or "",
            "mode": s.mode,
            "code": str(s.code),
            "submitTime": str(s.submit_ms),
            "day": day,
            "status": status,
            "promptHash": _prompt_hash(s.prompt),
            "quota": ",".join(s.quota_periods),
        }
        member = f"{s.upstream}/{s.task_id}"
        indexes = [
            (self.keys.ledger_index("all"), member, float(s.submit_ms)),
            (self.keys.ledger_index("client", client.name), member, float(s.submit_ms)),
            (self.keys.ledger_index("open", s.upstream), member, float(s.submit_ms)),
        ]
        if client.team:
            team = self.keys.ledger_index("team", client.team)
            indexes.append((team, member, float(s.submit_ms)))
        self._seen.set((s.upstream, s.task_id), status)
        CALLER_SUBMITS.labels(client.name, s.action).inc()
        count = {f"{client.name}|{s.action}|{s.upstream}|submitted": 1}
        try:
            await asyncio.gather(
                self.store.write_record(
                    self.keys.ledger_task(s.upstream, s.task_id), fields, self.retention_ms
                ),
                self.store.index_add(indexes, self.retention_ms, s.submit_ms - self.retention_ms),
                self.store.add_counts(self.keys.usage_day(day), count, self._counts_ttl(day)),
            )
        except StoreError as exc:
            log.warning("store_error", purpose="ledger_record", error=str(exc))

    def _counts_ttl(self, day: str) -> int:
        """A day's counters live until the whole day has left the retention window."""
        end = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
        return max(1, int(end.timestamp() * 1000 - time.time() * 1000) + self.retention_ms)

    def saw(self, upstream: str, task: dict[str, Any]) -> None:
        """A lookup learned a task's state from its upstream (called by the task cache). Only
        tasks submitted through mjgate are followed, and only news is written, in the
        background."""
        task_id, status = task.get("id"), task.get("status")
        if not isinstance(task_id, str) or status not in STATUSES:
            return
        owner = self.owners.local_owner(task_id)
        if owner is None or owner.client is None or owner.upstream != upstream:
            return
        if self._seen.get((upstream, task_id)) == status:
            return
        self._seen.set((upstream, task_id), str(status))
        finish = task.get("finishTime")
        finish_ms = finish if isinstance(finish, int) and not isinstance(finish, bool) else None
        self._spawn(self._advance(upstream, task_id, str(status), finish_ms))

    async def _advance(
        self, upstream: str, task_id: str, status: str, finish_ms: int | None
    ) -> None:
        fields = {"status": status}
        if finish_ms:
            fields["finishTime"] = str(finish_ms)
        key = self.keys.ledger_task(upstream, task_id)
        try:
            record = await self.store.advance_record(key, fields, status in TERMINAL)
            if record is not None:
                await self._finished(record, status)
        except StoreError as exc:
            self._seen.pop((upstream, task_id))  # the next sighting tries again
            log.warning("store_error", purpose="ledger_status", error=str(exc))

    async def _finished(self, record: dict[str, str], status: str) -> None:
        """Count a task's outcome, once in the fleet; refund a failed task's quota unit."""
        client, action, upstream = record["client"], record["action"], record["upstream"]
        CALLER_TASKS_FINISHED.labels(client, action, status).inc()
        day = record["day"]
        count = {f"{client}|{action}|{upstream}|{OUTCOMES[status]}": 1}
        member = f"{upstream}/{record['id']}"
        await asyncio.gather(
            self.store.add_counts(self.keys.usage_day(day), count, self._counts_ttl(day)),
            self.store.index_remove(self.keys.ledger_index("open", upstream), member),
        )
        config = self._clients.get(client)
        periods = tuple(p for p in record.get("quota", "").split(",") if p)
        if status == "FAILURE" and config and self.quotas.of(config).refund_failed:
            await self.quotas.release_periods(client, periods)

    # -- reading ------------------------------------------------------------------------------

    async def usage(self, query: UsageQuery) -> list[dict[str, Any]]:
        """Counts per group over whole UTC days ``start..end`` inside the retention window."""
        now = time.time()
        oldest = datetime.fromtimestamp(now - self.retention_ms / 1000, UTC).date()
        start = max(query.start, oldest)
        end = min(query.end, datetime.fromtimestamp(now, UTC).date())
        days = [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
        counts = await self.store.read_records([self.keys.usage_day(d) for d in days])
        rows: dict[tuple[str, ...], dict[str, int]] = {}
        for day, fields in zip(days, counts, strict=True):
            for field, value in fields.items():
                client, action, upstream, outcome = field.split("|")
                if query.client is not None and client != query.client:
                    continue
                facts = {"day": day, "client": client, "action": action, "upstream": upstream}
                group = tuple(facts[name] for name in query.group_by)
                row = rows.setdefault(group, dict.fromkeys(COUNTS, 0))
                row[outcome] += int(value)
        return [
            {
                **dict(zip(query.group_by, group, strict=True)),
                **row,
                "unfinished": row["submitted"] - sum(row[o] for o in OUTCOMES.values()),
            }
            for group, row in sorted(rows.items())
        ]

    async def tasks(self, query: TaskQuery) -> TaskPage:
        """Records newest first, filtered, ``limit`` at a time from ``cursor``."""
        now_ms = int(time.time() * 1000)
        low = float(max(query.since_ms or 0, now_ms - self.retention_ms))
        high = float(query.until_ms if query.until_ms is not None else now_ms + DAY_MS)
        if query.stuck:
            indexes = [self.keys.ledger_index("open", u) for u in self.upstreams]
            high = min(high, now_ms - self.stuck_after_ms)
        elif query.client is not None:
            indexes = [self.keys.ledger_index("client", query.client)]
        else:
            indexes = [self.keys.ledger_index("all")]
        position = (high, _AFTER_EVERY_MEMBER)
        if query.cursor is not None:
            position = min(position, _parse_cursor(query.cursor))
        found: list[dict[str, Any]] = []
        batch = max(query.limit, _SCAN_BATCH)
        while len(found) < query.limit:
            entries, exhausted = await self._scan(indexes, position, low, batch)
            if not entries and exhausted:
                return TaskPage(found, None)
            if not entries:
                batch *= 2  # more tasks share one millisecond than a batch holds
                continue
            keys = [self.keys.ledger_task(*member.split("/", 1)) for member, _ in entries]
            records = await self.store.read_records(keys)
            for (member, score), record in zip(entries, records, strict=True):
                position = (score, member)
                if record and _matches(record, query):
                    found.append(_public(record))
                    if len(found) == query.limit:
                        break
            else:
                if exhausted:
                    return TaskPage(found, None)
        return TaskPage(found, f"{int(position[0])}.{position[1]}")

    async def _scan(
        self, indexes: Sequence[str], position: tuple[float, str], low: float, batch: int
    ) -> tuple[list[tuple[str, float]], bool]:
        """Index entries strictly after ``position`` (newest first), merged over indexes;
        ``exhausted`` when no index has more below what was returned."""
        ranges = await asyncio.gather(
            *(self.store.index_range(key, position[0], low, batch) for key in indexes)
        )
        merged = {
            member: score for rows in ranges for member, score in rows if (score, member) < position
        }
        entries = sorted(merged.items(), key=lambda e: (e[1], e[0]), reverse=True)
        exhausted = all(len(rows) < batch for rows in ranges) and len(entries) <= batch
        return entries[:batch], exhausted

    async def visible_ids(self, client: ClientConfig, limit: int) -> list[str]:
        """The newest ids a restricted caller may see: its own, or its team's."""
        indexes = [self.keys.ledger_index("client", client.name)]
        if client.visibility == "team" and client.team:
            indexes.append(self.keys.ledger_index("team", client.team))
        low = float(time.time() * 1000 - self.retention_ms)
        ranges = await asyncio.gather(
            *(self.store.index_range(key, math.inf, low, limit) for key in indexes)
        )
        entries = sorted(
            {member: score for rows in ranges for member, score in rows}.items(),
            key=lambda e: (e[1], e[0]),
            reverse=True,
        )
        ids = (member.split("/", 1)[1] for member, _ in entries)
        return list(dict.fromkeys(ids))[:limit]

    async def stuck_counts(self) -> dict[str, int]:
        """Stuck tasks per upstream."""
        now_ms = time.time() * 1000
        keys = [self.keys.ledger_index("open", u) for u in self.upstreams]
        counts = await self.store.index_count(
            keys, now_ms - self.retention_ms, now_ms - self.stuck_after_ms
        )
        return dict(zip(self.upstreams, counts, strict=True))

    async def unfinished(self, upstream: str, limit: int) -> list[dict[str, str]]:
        """For the watcher: records of the upstream's tasks that are neither final nor stuck
        (submitted within ``ledger.stuck_after_s``), newest first, at most ``limit``."""
        now_ms = time.time() * 1000
        key = self.keys.ledger_index("open", upstream)
        entries = await self.store.index_range(
            key, now_ms + DAY_MS, now_ms - self.stuck_after_ms, limit
        )
        keys = [self.keys.ledger_task(*member.split("/", 1)) for member, _ in entries]
        records = await self.store.read_records(keys)
        return [r for r in records if r and r.get("status") not in TERMINAL]

    async def watch_stuck(self) -> None:
        """Keep the stuck-tasks gauge current, for as long as the services live."""
        every_s = min(30.0, max(0.5, self.stuck_after_ms / 2000))
        while True:
            try:
                for upstream, count in (await self.stuck_counts()).items():
                    STUCK_TASKS.labels(upstream).set(count)
            except StoreError as exc:
                log.warning("store_error", purpose="ledger_stuck", error=str(exc))
            await asyncio.sleep(every_s)


def usage_csv(rows: list[dict[str, Any]], group_by: Sequence[str]) -> str:
    """Usage rows as CSV, a header line first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = [*group_by, *COUNTS, "unfinished"]
    writer.writerow(columns)
    writer.writerows([row[name] for name in columns] for row in rows)
    return out.getvalue()


def _prompt_hash(prompt: str | None) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16] if prompt else ""


def _parse_cursor(cursor: str) -> tuple[float, str]:
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise GatewayError(400, "cursor is not one this route handed out")
    return float(match.group(1)), match.group(2)


def _matches(record: dict[str, str], query: TaskQuery) -> bool:
    return (
        (query.client is None or record.get("client") == query.client)
        and (query.status is None or record.get("status") == query.status)
        and (query.action is None or record.get("action") == query.action)
    )


def _public(record: dict[str, str]) -> dict[str, Any]:
    """A record as the task log shows it."""
    finish = record.get("finishTime")
    return {
        "id": record["id"],
        "client": record["client"],
        "team": record.get("team") or None,
        "upstream": record["upstream"],
        "action": record["action"],
        "parent": record.get("parent") or None,
        "mode": record.get("mode", ""),
        "status": record["status"],
        "submitTime": int(record["submitTime"]),
        "finishTime": int(finish) if finish else None,
        "code": int(record.get("code") or 0),
        "promptHash": record.get("promptHash") or None,
    }


async def read_usage(config: Config, query: UsageQuery) -> list[dict[str, Any]]:
    """Usage straight from Redis, for ``mjgate usage``. Raises ValueError when the store
    cannot be reached."""
    store = RedisStore(config.redis)
    try:
        await store.ping()
        keys = KeySpace(config.redis.key_prefix)
        owners = OwnerMap(store, keys, config.cache.owner_ttl_s, 0)
        ledger = Ledger(store, keys, config, owners, Quotas(store, keys, config), _no_spawn)
        return await ledger.usage(query)
    except StoreError as exc:
        raise ValueError(f"cannot reach the store: {exc}") from None
    finally:
        await store.close()


def _no_spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    coroutine.close()
