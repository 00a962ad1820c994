"""``mjgate sim``: a simulated midjourney-proxy upstream.

Teams point their clients at it to develop without spending credits, and the gateway's tests
and benchmarks use it as the upstream. It plays each task's life over time, speaks the Java,
C# and relay flavors (auth style, not-found answer, error bodies, queue-full code), serves
both list spellings, ``query`` and the submit codes, and injects latency, errors, hangs and
queue-full answers on demand. ``/_sim/...`` is an unauthenticated control API for tests.

It imports nothing from the gateway but the protocol's constants (``gateway.protocol``): a
simulator that shared the gateway's code would agree with the gateway's mistakes.
"""

from __future__ import annotations

from gateway.sim.app import create_sim_app
from gateway.sim.cli import add_sim_arguments, main, run_sim, settings_from_args
from gateway.sim.settings import SimSettings

__all__ = [
    "SimSettings",
    "add_sim_arguments",
    "create_sim_app",
    "main",
    "run_sim",
    "settings_from_args",
]
