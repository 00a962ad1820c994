"""Finding tasks across upstreams: owner-aware fetch, fan-out to every upstream, list merge."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.config import FanoutConfig
from gateway.middleware import RequestInfo
from gateway.owners import OwnerMap
from gateway.tasks import in_request_order, is_not_found, parse_task_list
from gateway.upstreams import Upstream, UpstreamError, UpstreamResponse

__all__ = ["ListResult", "TaskLookup", "UpstreamFailures", "call"]


class UpstreamFailures(Exception):
    """Every upstream that could have answered failed."""

    def __init__(self, errors: Sequence[UpstreamError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = list(errors)

    @property
    def timed_out(self) -> bool:
        return all(e.kind == "timeout" for e in self.errors)


@dataclass(slots=True)
class ListResult:
    tasks: list[Any] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def call(
    upstream: Upstream,
    info: RequestInfo,
    method: str,
    path: str,
    body: bytes | None = None,
    caller_headers: Sequence[tuple[str, str]] = (),
) -> UpstreamResponse:
    """One upstream request, noted in the request's log facts.

    An answer that is an upstream failure rather than an answer about the task (the gateway's
    key refused, rate limited, 5xx) raises UpstreamError like a dropped connection does.
    """
    info.upstreams.append(upstream.name)
    response = await upstream.request(
        method, path, request_id=info.request_id, body=body, caller_headers=caller_headers
    )
    info.upstream_ms += response.elapsed_s * 1000
    if response.status in (401, 403):
        detail = f"rejected the gateway's key (HTTP {response.status}); check its key in config"
        raise UpstreamError(upstream.name, "broken", True, detail)
    return response


def failed_answer(response: UpstreamResponse) -> UpstreamError | None:
    """An HTTP answer that says the upstream could not serve, as opposed to an answer."""
    if response.status == 429 or response.status >= 500:
        detail = f"answered HTTP {response.status}"
        return UpstreamError(response.upstream, "broken", True, detail)
    return None


class TaskLookup:
    """Asks the right upstreams about task ids and remembers who owns what."""

    def __init__(self, owners: OwnerMap, fanout: FanoutConfig) -> None:
        self.owners = owners
        self.fanout = fanout

    async def fetch(
        self, mode: str, task_id: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> UpstreamResponse | None:
        """The task's answer from its owner, or from whichever upstream has it; None if none."""
        path = f"{mode}/mj/task/{task_id}/fetch"
        owner_name = await self.owners.get(task_id)
        if owner_name is not None:
            owner = next((u for u in allowed if u.name == owner_name), None)
            # A task owned by an upstream this caller may not use does not exist for them.
            return None if owner is None else await self._fetch_one(owner, path, info)
        return await self._fetch_any(task_id, path, allowed, info)

    async def owner_of(
        self, mode: str, task_id: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> Upstream | None:
        """The upstream that owns a task, asking every allowed upstream when unknown."""
        owner_name = await self.owners.get(task_id)
        if owner_name is None:
            found = await self._fetch_any(task_id, f"{mode}/mj/task/{task_id}/fetch", allowed, info)
            owner_name = found.upstream if found else None
        return next((u for u in allowed if u.name == owner_name), None)

    async def _fetch_one(
        self, upstream: Upstream, path: str, info: RequestInfo
    ) -> UpstreamResponse | None:
        response = await call(upstream, info, "GET", path)
        if error := failed_answer(response):
            raise UpstreamFailures([error])
        return None if is_not_found(response.status, response.content) else response

    async def _fetch_any(
        self, task_id: str, path: str, allowed: Sequence[Upstream], info: RequestInfo
    ) -> UpstreamResponse | None:
        """Ask every upstream at once; the first that has the task wins and becomes its owner."""
        errors: list[UpstreamError] = []
        pending = {asyncio.create_task(self._fetch_one(u, path, info)) for u in allowed}
        try:
            for next_done in asyncio.as_completed(pending, timeout=self.fanout.deadline_s):
                try:
                    response = await next_done
                except UpstreamFailures as exc:
                    errors.extend(exc.errors)
                    continue
                except UpstreamError as exc:
                    errors.append(exc)
                    continue
                if response is not None:
                    await self.owners.record(task_id, response.upstream)
                    return response
        except TimeoutError:
            answered = {e.upstream for e in errors}
            errors += [
                UpstreamError(u.name, "timeout", True, "missed the fan-out deadline")
                for u in allowed
                if u.name not in answered
            ]
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
        """Tasks for these ids from every upstream that may hold them, in the caller's order.

        Ids with a known owner go to that owner only; the rest go to every allowed upstream.
        An upstream that fails is named in ``failed``; if all fail, UpstreamFailures.
        """
        unique = list(dict.fromkeys(ids))
        known = await self.owners.get_many(unique)
        unknown = [t for t in unique if t not in known]
        groups = {u.name: [t for t in unique if known.get(t) == u.name] + unknown for u in allowed}
        calls = [(u, groups[u.name]) for u in allowed if groups[u.name]]
        if not calls:
            return ListResult()
        outcomes = await self._gather_lists(mode, calls, info)
        found: dict[str, Any] = {}
        discovered: dict[str, str] = {}
        errors: list[UpstreamError] = []
        for (upstream, asked), outcome in zip(calls, outcomes, strict=True):
            if isinstance(outcome, UpstreamError):
                errors.append(outcome)
                continue
            wanted = set(asked)
            for task in outcome:
                task_id = task["id"]
                if task_id in wanted and task_id not in found:
                    found[task_id] = task
                    if task_id not in known:
                        discovered[task_id] = upstream.name
        if len(errors) == len(calls):
            raise UpstreamFailures(errors)
        await self.owners.record_many(discovered)
        return ListResult(
            tasks=in_request_order(unique, found), failed=[e.upstream for e in errors]
        )

    async def _gather_lists(
        self, mode: str, calls: list[tuple[Upstream, list[str]]], info: RequestInfo
    ) -> list[list[dict[str, Any]] | UpstreamError]:
        """Every upstream's list answer, or its error, under one fan-out deadline."""
        jobs = [asyncio.create_task(self._list_one(mode, u, ids, info)) for u, ids in calls]
        _, pending = await asyncio.wait(jobs, timeout=self.fanout.deadline_s)
        for job in pending:
            job.cancel()
        outcomes: list[list[dict[str, Any]] | UpstreamError] = []
        for (upstream, _), job in zip(calls, jobs, strict=True):
            if job in pending:
                outcomes.append(
                    UpstreamError(upstream.name, "timeout", True, "missed the fan-out deadline")
                )
            elif isinstance(exc := job.exception(), UpstreamError):
                outcomes.append(exc)
            elif exc is not None:
                raise exc
            else:
                outcomes.append(job.result())
        return outcomes

    async def _list_one(
        self, mode: str, upstream: Upstream, ids: list[str], info: RequestInfo
    ) -> list[dict[str, Any]]:
        path = f"{mode}{upstream.config.list_by_ids_path}"
        response = await call(upstream, info, "POST", path, orjson.dumps({"ids": ids}))
        if error := failed_answer(response):
            raise error
        if is_not_found(response.status, response.content):
            return []
        tasks = parse_task_list(response.content)
        if tasks is None or response.status != 200:
            detail = f"answered HTTP {response.status} with something other than a task list"
            raise UpstreamError(upstream.name, "broken", True, detail)
        return tasks
