"""Facts of the midjourney-proxy protocol that the gateway and the simulator both speak.

Constants only: no behavior lives here, so the simulator can share them without sharing the
code it exists to check.
"""

from __future__ import annotations

__all__ = [
    "ACCEPTED_CODES",
    "MODES",
    "STATUSES",
    "TASK_ID_PATTERN",
    "TERMINAL",
]

STATUSES = frozenset(
    {"NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "FAILURE", "SUCCESS", "CANCEL"}
)
# Upstreams never change a task again once it reaches one of these.
TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCEL"})

# Submit envelope codes meaning the upstream took the work: accepted, waiting in MODAL, queued.
ACCEPTED_CODES = frozenset({1, 21, 22})

# Speed-mode prefixes of new-api relays (`/mj-fast/mj/submit/imagine`); kept when forwarding.
MODES = ("", "/mj-fast", "/mj-relax", "/mj-turbo")

# Task ids are milliseconds plus three digits upstream; the gateway accepts this wider shape.
TASK_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
