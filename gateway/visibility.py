"""Who may see which task: ``clients[].visibility`` is ``all`` (every task), ``team`` (tasks
submitted through mjgate by the caller's team) or ``own`` (by the caller alone).

Admin clients see every task. A task a caller may not see is answered exactly like a task
that does not exist, so that its existence does not leak. The submitter is kept with the
owner (``gateway.owners``): a caller that sees everything costs nothing, and a restricted
one costs no I/O when this process holds the owner.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import ClientConfig
from gateway.owners import Owner, OwnerMap

__all__ = ["Visibility", "restricted", "sees"]


def restricted(client: ClientConfig) -> bool:
    """Does this caller see fewer tasks than all of them?"""
    return client.visibility != "all" and not client.admin


def sees(client: ClientConfig, owner: Owner | None) -> bool:
    """May a restricted caller see a task with this owner record?"""
    if owner is None or owner.client is None:
        return False
    if owner.client == client.name:
        return True
    return client.visibility == "team" and bool(client.team) and owner.team == client.team


class Visibility:
    """Checks task ids against a caller's visibility, reading submitters from the owner map."""

    def __init__(self, owners: OwnerMap) -> None:
        self.owners = owners

    def known_visible(self, client: ClientConfig, task_id: str) -> bool:
        """True when the caller surely sees the task, decided without I/O. False means "ask
        ``visible``": this process may not hold the task's submitter yet."""
        if not restricted(client):
            return True
        return sees(client, self.owners.local_owner(task_id))

    async def visible(self, client: ClientConfig, task_ids: Sequence[str]) -> set[str]:
        """The ids among these the caller may see (at most one store round trip)."""
        if not restricted(client):
            return set(task_ids)
        owners = await self.owners.owners(task_ids, need_submitter=True)
        return {t for t in task_ids if sees(client, owners.get(t))}

    async def check(self, client: ClientConfig, task_id: str) -> bool:
        """May the caller see this one task?"""
        return self.known_visible(client, task_id) or bool(await self.visible(client, [task_id]))
