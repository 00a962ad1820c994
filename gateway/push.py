"""Upstream push: a provider that can reach mjgate calls mjgate's own hook with each change.

With ``server.public_url`` and ``upstreams[].push: true``, every submit to that upstream
carries ``notifyHook: {public_url}/mj/notify/{upstream}/{token}``, the token an HMAC of the
upstream's name under ``server.secret_key``: it cannot be guessed, and it holds across
restarts and workers. A callback is taken only for a task that upstream owns, or while a
submit to it is in flight (providers call back SUBMITTED before their submit answer
arrives). What is taken goes into the task cache at once, and from there to the ledger, the
task's event stream and its callbacks. The watcher remains the safety net.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from typing import Any

from gateway.config import Config, UpstreamConfig
from gateway.errors import StoreError
from gateway.owners import OwnerMap
from gateway.store import KeySpace, Store

__all__ = ["NOTIFY_PREFIX", "Pushes"]

NOTIFY_PREFIX = "/mj/notify/"
_PURPOSE = b"mjgate upstream push v1"


class Pushes:
    """The push hooks of upstreams that push, and the checks on what they send."""

    def __init__(self, config: Config, store: Store, keys: KeySpace, owners: OwnerMap) -> None:
        self.store = store
        self.keys = keys
        self.owners = owners
        self.public_url = config.server.public_url
        key = hmac.new(config.server.secret_key.reveal().encode(), _PURPOSE, hashlib.sha256)
        self._key = key.digest()
        self._pushing = {u.name: u for u in config.upstreams if u.push}

    def token(self, upstream: str) -> str:
        return hmac.new(self._key, upstream.encode(), hashlib.sha256).hexdigest()[:40]

    def hook_url(self, upstream: str) -> str | None:
        """The ``notifyHook`` to send this upstream; None when it does not push."""
        if upstream not in self._pushing:
            return None
        return f"{self.public_url}{NOTIFY_PREFIX}{upstream}/{self.token(upstream)}"

    def upstream_for(self, name: str, token: str) -> UpstreamConfig | None:
        """The pushing upstream this URL belongs to; None for any other name or token."""
        upstream = self._pushing.get(name)
        if upstream is None or not hmac.compare_digest(self.token(name), token):
            return None
        return upstream

    async def submitting(self, upstream: UpstreamConfig) -> None:
        """A submit to this upstream is about to be sent: callbacks for tasks not yet known
        are taken from it until the submit can no longer be in flight."""
        if upstream.name not in self._pushing:
            return
        window_ms = int((upstream.queue_timeout_s + upstream.timeout_s + 1) * 1000)
        # On a store failure only callbacks for tasks already known are taken.
        with contextlib.suppress(StoreError):
            await self.store.set_many({self.keys.push_submitting(upstream.name): b"1"}, window_ms)

    async def belongs(self, upstream: str, task: dict[str, Any]) -> bool:
        """Is this pushed task one of the upstream's, as far as mjgate knows?"""
        owner = await self.owners.get(str(task["id"]))
        if owner is not None:
            return owner == upstream
        (marker,) = await self.store.mget([self.keys.push_submitting(upstream)])
        return marker is not None
