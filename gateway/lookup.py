"""Finding tasks: cache tiers first, then the owner upstream, then every allowed upstream.

A fetch is answered from L1 (no I/O), else from one store round trip, else from upstream
through a per-process single flight, so a hundred pollers of one running task cost one
upstream call. A list lookup serves cached ids first, then asks each upstream once for the
rest (grouped by owner, chunked) under one deadline, and merges in the caller's order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.cache import CachedTask, StoreView, TaskCache, encode_task
from gateway.config import FanoutConfig
from gateway.context import RequestInfo
from gateway.errors import UpstreamError, UpstreamFailures
from gateway.flights import Flights
from gateway.metrics import COALESCED, FANOUT_WIDTH, L1_HIT, L1_MISS, STORE_HIT, STORE_MISS
from gateway.owners import OwnerMap
from gateway.tasks import is_not_found, parse_task, parse_task_list
from gateway.upstreams import (
    FANOUT_GRACE_S,
    Upstream,
    UpstreamResponse,
    call,
    failed_answer,
    gather_within,
    missed_deadline,
)

__all__ = ["Answer", "ListResult", "TaskLookup"]

Found = tuple[UpstreamResponse, dict[str, Any]]  # an upstream's answer and the task in it


# Not frozen (a frozen __init__ costs a microsecond more, and a cached fetch makes one), but
# treated as immutable: ``dataclasses.replace`` makes the variants.
@dataclass(slots=True)
class Answer:
    """A fetch's outcome: the task's bytes (``found``) or "no such task", and where from."""

    found: bool
    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    cache: str = "MISS"  # HIT | MISS | COALESCED
    tier: str = "upstream"  # l1 | store | upstream

    @staticmethod
    def cached(entry: CachedTask, tier: str) -> Answer:
        return Answer(True, entry.body, cache="HIT" if entry.terminal else "COALESCED", tier=tier)


_MISSING_FROM_CACHE = Answer(False, cache="HIT", tier="store")
_MISSING = Answer(False)


@dataclass(slots=True)
class ListResult:
    body: bytes = b"[]"
    failed: list[str] = field(default_factory=list)
    cache: str = "HIT"


class TaskLookup:
    """Asks the cache and the right upstreams about task ids, and remembers who owns what."""

    def __init__(self, owners: OwnerMap, cache: TaskCache, fanout: FanoutConfig) -> None:
        self.owners = owners
        self.cache = cache
        self.fanout = fanout
        self._flights: Flights[tuple[str, frozenset[str]], Answer] = Flights()

    def fetch_cached(self, task_id: str, names: frozenset[str]) -> Answer | None:
        """The L1 answer when this process holds one: no I/O, no await."""
        owner = self.owners.local(task_id)
        if owner is None:
            return None
        if owner not in names:
            return _MISSING_FROM_CACHE
        entry = self.cache.local(owner, task_id)
        return Answer.cached(entry, "l1") if entry is not None else None

    async def fetch(
        self, mode: str, task_id: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> Answer:
        """The task from L1, the store or upstream; concurrent misses share one flight."""
        names = frozenset(u.name for u in allowed)
        answer = self.fetch_cached(task_id, names)
        (L1_HIT if answer is not None and answer.tier == "l1" else L1_MISS).inc()
        if answer is not None:
            return answer
        answer, shared = await self._flights.join(
            (task_id, names), lambda: self._fetch_uncached(mode, task_id, allowed, names, info)
        )
        if not shared:
            return answer
        COALESCED.inc()
        return dataclasses.replace(answer, cache="COALESCED")

    async def _fetch_uncached(
        self,
        mode: str,
        task_id: str,
        allowed: Sequence[Upstream],
        names: frozenset[str],
        info: RequestInfo,
    ) -> Answer:
        _prepare(allowed, self.owners.local(task_id))
        views = await self.cache.read([task_id], [u.name for u in allowed])
        view = views.get(task_id) or StoreView()
        view.owner = view.owner or self.owners.local(task_id)
        if view.owner is not None and view.owner not in names:
            return _MISSING_FROM_CACHE
        if view.task is not None:
            STORE_HIT.inc()
            return Answer.cached(view.task, "store")
        STORE_MISS.inc()
        asked = {view.owner} if view.owner is not None else names
        if asked <= view.not_found_on:
            return _MISSING_FROM_CACHE
        if view.owner is None:
            found = await self._fetch_any(mode, task_id, allowed, info)
        else:
            owner = next(u for u in allowed if u.name == view.owner)
            found = await self._fetch_one(owner, mode, task_id, info)
        if found is None:
            await self.cache.put_not_found({task_id: asked})
            return _MISSING
        response, task = found
        (body,) = await self.cache.put_tasks([(response.upstream, task, response.content)])
        return Answer(True, body, response.status, response.content_type)

    async def owner_of(
        self, mode: str, task_id: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> Upstream | None:
        """The upstream that owns a task, asking every allowed upstream when unknown."""
        owner_name = await self.owners.get(task_id)
        if owner_name is None:
            found = await self._fetch_any(mode, task_id, allowed, info)
            owner_name = found[0].upstream if found else None
        return next((u for u in allowed if u.name == owner_name), None)

    async def _fetch_one(
        self,
        upstream: Upstream,
        mode: str,
        task_id: str,
        info: RequestInfo,
        timeout_s: float | None = None,
    ) -> Found | None:
        """The task from one upstream, None if it has no such task.

        Only a 200 holding this very task counts as found: any other answer (a relay's quota
        error, say) is that upstream failing, and must not make it the task's owner.
        """
        path = f"{mode}/mj/task/{task_id}/fetch"
        response = await call(upstream, info, "fetch", "GET", path, timeout_s=timeout_s)
        if error := failed_answer(response):
            raise UpstreamFailures([error])
        if is_not_found(response.status, response.content):
            return None
        task = parse_task(response.content) if response.status == 200 else None
        if task is None or task["id"] != task_id:
            detail = f"answered HTTP {response.status} with something other than the task"
            raise UpstreamFailures([UpstreamError(upstream.name, "broken", True, detail)])
        return response, task

    async def _fetch_any(
        self, mode: str, task_id: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> Found | None:
        """Ask every upstream at once; the first that has the task wins and becomes its owner."""
        errors: list[UpstreamError] = []
        answered: set[str] = set()
        FANOUT_WIDTH.observe(len(allowed))
        deadline_s = self.fanout.deadline_s

        async def ask(upstream: Upstream) -> Found | None:
            try:
                return await self._fetch_one(upstream, mode, task_id, info, deadline_s)
            finally:
                answered.add(upstream.name)

        pending = {asyncio.create_task(ask(u)) for u in allowed}
        try:
            for next_done in asyncio.as_completed(pending, timeout=deadline_s + FANOUT_GRACE_S):
                try:
                    found = await next_done
                except UpstreamFailures as exc:
                    errors.extend(exc.errors)
                    continue
                except UpstreamError as exc:
                    errors.append(exc)
                    continue
                if found is not None:
                    await self.owners.record(task_id, found[0].upstream)
                    return found
        except TimeoutError:
            # Blame only those that had not answered: a "not found" is an answer.
            errors += [missed_deadline(u) for u in allowed if u.name not in answered]
        finally:
            for task in pending:
                task.cancel()
        # "Not found" is only sure when every upstream said so.
        if errors:
            raise UpstreamFailures(errors)
        return None

    async def list_tasks(
        self, mode: str, ids: Sequence[str], allowed: Sequence[Upstream], info: RequestInfo
    ) -> ListResult:
        """Tasks for these ids, cached ones first, the rest from upstream, in the caller's
        order as one JSON array. An upstream that fails is named in ``failed``; if every
        upstream asked fails, UpstreamFailures."""
        unique = list(dict.fromkeys(ids))
        names = frozenset(u.name for u in allowed)
        bodies: dict[str, bytes] = {}
        owners: dict[str, str] = {}
        uncached: list[str] = []
        for task_id in unique:
            owner = self.owners.local(task_id)
            if owner is not None and owner not in names:
                continue
            entry = self.cache.local(owner, task_id) if owner else None
            if entry is not None:
                bodies[task_id] = entry.body
            else:
                uncached.append(task_id)
        if uncached:
            _prepare(allowed, None)
        views = await self.cache.read(uncached, [u.name for u in allowed])
        wanted: list[str] = []
        for task_id in uncached:
            view = views.get(task_id) or StoreView()
            view.owner = view.owner or self.owners.local(task_id)
            if view.owner is not None:
                if view.owner not in names:
                    continue
                owners[task_id] = view.owner
            if view.task is not None:
                bodies[task_id] = view.task.body
            elif not ({view.owner} if view.owner else names) <= view.not_found_on:
                wanted.append(task_id)
        result = ListResult()
        if wanted:
            result = await self._list_from_upstreams(mode, wanted, owners, allowed, bodies, info)
        result.body = b"[" + b",".join(bodies[t] for t in unique if t in bodies) + b"]"
        return result

    async def _list_from_upstreams(
        self,
        mode: str,
        wanted: list[str],
        owners: dict[str, str],
        allowed: Sequence[Upstream],
        bodies: dict[str, bytes],
        info: RequestInfo,
    ) -> ListResult:
        """Ask each upstream once per chunk for the ids it may hold; fill ``bodies``."""
        unknown = [t for t in wanted if t not in owners]
        size = self.fanout.batch_size
        calls: list[tuple[Upstream, list[str]]] = []
        for upstream in allowed:
            ids = [t for t in wanted if owners.get(t) == upstream.name] + unknown
            calls += [(upstream, ids[i : i + size]) for i in range(0, len(ids), size)]
        FANOUT_WIDTH.observe(len(calls))
        outcomes = await gather_within(
            self.fanout.deadline_s, [(u, self._list_one(mode, u, ids, info)) for u, ids in calls]
        )
        errors: list[UpstreamError] = []
        failed_calls = 0
        fresh: list[tuple[str, dict[str, Any], bytes]] = []
        discovered: dict[str, str] = {}
        failed_ids: set[str] = set()
        for (upstream, asked), outcome in zip(calls, outcomes, strict=True):
            if isinstance(outcome, UpstreamFailures):
                errors += outcome.errors
                failed_calls += 1
                failed_ids.update(asked)
                continue
            wanted_here = set(asked)
            for task in outcome:
                task_id = task["id"]
                if task_id in wanted_here and task_id not in bodies:
                    body = encode_task(task)
                    bodies[task_id] = body
                    fresh.append((upstream.name, task, body))
                    if task_id not in owners:
                        discovered[task_id] = upstream.name
        if failed_calls == len(calls):
            raise UpstreamFailures(errors)
        await self.owners.record_many(discovered)
        for (_, task, _), body in zip(fresh, await self.cache.put_tasks(fresh), strict=True):
            bodies[task["id"]] = body  # as cached: image links rewritten, if they are
        names = frozenset(u.name for u in allowed)
        missing = {
            t: ({owners[t]} if t in owners else names)
            for t in wanted
            if t not in bodies and t not in failed_ids
        }
        await self.cache.put_not_found(missing)
        failed = list(dict.fromkeys(e.upstream for e in errors))
        return ListResult(failed=failed, cache="PARTIAL" if failed else "MISS")

    async def _list_one(
        self, mode: str, upstream: Upstream, ids: list[str], info: RequestInfo
    ) -> list[dict[str, Any]]:
        path = f"{mode}{upstream.config.list_by_ids_path}"
        body = orjson.dumps({"ids": ids})
        deadline_s = self.fanout.deadline_s
        response = await call(upstream, info, "list_by_ids", "POST", path, body, deadline_s)
        if error := failed_answer(response):
            raise error
        if is_not_found(response.status, response.content):
            return []
        tasks = parse_task_list(response.content)
        if tasks is None or response.status != 200:
            detail = f"answered HTTP {response.status} with something other than a task list"
            raise UpstreamError(upstream.name, "broken", True, detail)
        return tasks


def _prepare(allowed: Sequence[Upstream], owner: str | None) -> None:
    """Outbound leases for the upstreams a lookup may call (the owner's, when known) start
    beside its store read rather than after it."""
    for upstream in allowed:
        if owner is None or upstream.name == owner:
            upstream.caps.prepare()
