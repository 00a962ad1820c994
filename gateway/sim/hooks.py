"""Callbacks of the simulated upstream: a submit's ``notifyHook`` is called with the task's
JSON on each change of its status or progress, as the Java and C# upstreams do (new-api
relays turned callbacks off, so the relay flavor keeps them to itself). Each call is made
once, without retry or signature, as they make it.

Tasks play their lives lazily, so a loop looks at the tasks that have a hook a few times a
second and calls it when what they show has changed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import httpx

from gateway.protocol import TERMINAL
from gateway.sim.tasks import TaskStore

__all__ = ["HookCaller"]

LOOK_EVERY_S = 0.1
HISTORY = 200


class HookCaller:
    """The hooks of tasks still changing, and what was sent to them."""

    def __init__(self, store: TaskStore, enabled: bool) -> None:
        self.store = store
        self.enabled = enabled
        self._hooks: dict[str, tuple[str, str]] = {}  # task id -> (url, last state sent)
        self.received: deque[str] = deque(maxlen=HISTORY)  # every notifyHook submitted
        self.sent = 0
        self.failed = 0

    def remember(self, task_id: str, url: object) -> None:
        """A submit named this hook for the new task."""
        if isinstance(url, str) and url:
            self.received.append(url)
            if self.enabled:
                self._hooks[task_id] = (url, "")

    def reset(self) -> None:
        self.received.clear()
        self.sent = self.failed = 0

    async def run(self) -> None:
        """Call hooks until cancelled."""
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            while True:
                await asyncio.gather(*(self._look(client, t) for t in list(self._hooks)))
                await asyncio.sleep(LOOK_EVERY_S)

    async def _look(self, client: httpx.AsyncClient, task_id: str) -> None:
        url, last = self._hooks[task_id]
        task = self.store.get(task_id)
        if task is None:
            del self._hooks[task_id]
            return
        now = time.time()
        view = task.view(now)
        body = task.body_bytes(now)
        status = str(view.get("status"))
        state = f"{status}|{view.get('progress')}"
        if state == last:
            return
        if status in TERMINAL:
            del self._hooks[task_id]
        else:
            self._hooks[task_id] = (url, state)
        try:
            response = await client.post(
                url, content=body, headers={"content-type": "application/json"}
            )
            response.raise_for_status()
            self.sent += 1
        except httpx.HTTPError:
            self.failed += 1
