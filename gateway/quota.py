"""Submit quotas per caller: ``submits_per_day`` and ``submits_per_month`` (UTC), counted
exactly across every worker and replica.

A submit reserves one unit of each of its caller's quotas in the store, atomically and
before anything is sent; the unit goes back when the upstream did not take the work, and,
with ``refund_failed``, when the task ends FAILURE. Over quota, the caller gets 429 JSON
naming the quota and when it resets, and nothing reaches an upstream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
import structlog
from starlette.responses import Response

from gateway.config import ClientConfig, Config, Quota
from gateway.errors import GatewayError, StoreError
from gateway.metrics import QUOTA_REFUSED
from gateway.store import KeySpace, Store

__all__ = ["QuotaRefusal", "Quotas", "Reservation"]

log = structlog.get_logger("mjgate.quota")

# A counter outlives its period by this much, so a refund just after the reset finds it.
_KEEP_AFTER_RESET = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The units one submit holds: ``periods`` like ``d:2026-05-01`` and ``m:2026-05``."""

    client: str
    periods: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    """A submit refused because ``quota`` (``submits_per_day`` ...) is used up."""

    client: str
    quota: str
    limit: int
    resets_at: datetime

    def response(self, request_id: str, now: datetime) -> Response:
        """429 in mjgate's error shape, naming the quota, with when it resets."""
        resets = self.resets_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        description = (
            f"quota {self.quota} of client {self.client!r} is used up ({self.limit} submits); "
            f"it resets at {resets}"
        )
        body = {
            "code": 4,
            "description": description,
            "result": None,
            "request_id": request_id,
            "quota": {"name": self.quota, "limit": self.limit, "resets_at": resets},
        }
        wait_s = max(1, math.ceil((self.resets_at - now).total_seconds()))
        return Response(
            orjson.dumps(body),
            status_code=429,
            headers={"retry-after": str(wait_s)},
            media_type="application/json",
        )


def _periods(now: datetime) -> list[tuple[str, str, datetime]]:
    """``(quota name, period id, reset time)`` for the day and the month holding ``now``."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return [
        ("submits_per_day", f"d:{day:%Y-%m-%d}", day + timedelta(days=1)),
        ("submits_per_month", f"m:{month:%Y-%m}", next_month),
    ]


class Quotas:
    """Reserves and gives back quota units in the store."""

    def __init__(self, store: Store, keys: KeySpace, config: Config) -> None:
        self.store = store
        self.keys = keys
        self.default = config.quota.default

    def of(self, client: ClientConfig) -> Quota:
        return client.quota or self.default

    async def reserve(
        self, client: ClientConfig, now: datetime | None = None
    ) -> Reservation | QuotaRefusal:
        """One unit of each limited quota of the caller, or the refusal of the first one used
        up. A caller without limits reserves nothing. Raises GatewayError (503) when the
        store cannot count: nothing is sent on a guess."""
        quota = self.of(client)
        now = now or datetime.now(UTC)
        limited = [
            (name, period, resets, limit)
            for name, period, resets in _periods(now)
            if (limit := getattr(quota, name)) is not None
        ]
        if not limited:
            return Reservation(client.name, ())
        keys = [self.keys.quota(client.name, period) for _, period, _, _ in limited]
        ttls = [
            int((resets + _KEEP_AFTER_RESET - now).total_seconds() * 1000)
            for _, _, resets, _ in limited
        ]
        try:
            refused = await self.store.reserve(keys, [limit for *_, limit in limited], ttls)
        except StoreError as exc:
            log.warning("store_error", purpose="quota_reserve", error=str(exc))
            raise GatewayError(503, "the quota could not be counted (store unavailable)") from exc
        if refused:
            name, _, resets, limit = limited[refused - 1]
            QUOTA_REFUSED.labels(client.name, name).inc()
            return QuotaRefusal(client.name, name, limit, resets)
        return Reservation(client.name, tuple(period for _, period, _, _ in limited))

    async def release(self, reservation: Reservation) -> None:
        """Give the units back (the upstream did not take the work, or it failed)."""
        await self.release_periods(reservation.client, reservation.periods)

    async def release_periods(self, client: str, periods: Sequence[str]) -> None:
        if not periods:
            return
        try:
            await self.store.unreserve([self.keys.quota(client, p) for p in periods])
        except StoreError as exc:
            log.warning("store_error", purpose="quota_release", error=str(exc))
