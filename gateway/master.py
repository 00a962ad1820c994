"""The gunicorn master's part (``deploy/gunicorn.conf.py`` calls it): the gateway's config is
read and checked in the master, before any worker starts.

- A config error stops start-up with the lines ``mjgate serve`` prints (one per problem) and
  exit status 2, where a worker failing to load it would halt gunicorn with a traceback.
- The master listens on ``server.host:server.port``; ``MJGATE_BIND`` or ``--bind`` override
  that, with a warning naming both addresses.
- A reload (SIGHUP) reads the file again and goes ahead only when the config is valid and
  any new address it asks for is free. Otherwise each problem is logged on one line and the
  running workers keep serving.

Workers are forked from the master and serve the config it checked (``worker_app``): they
never read the file themselves, so a respawned worker cannot pick up a file broken since.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway.config import Config, ConfigError
from gateway.configfile import load_config

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "BIND_ENV",
    "CONFIG_ENV",
    "bind_address",
    "check_reloads",
    "config_address",
    "report_bind",
    "report_invalid",
    "running_config",
    "worker_app",
]

CONFIG_ENV = "MJGATE_CONFIG"
BIND_ENV = "MJGATE_BIND"

# The config in effect: the one start-up loaded, then each one a reload found valid.
_running: list[Config] = []


def config_path() -> str:
    return os.environ.get(CONFIG_ENV, "config.yaml")


def report_invalid(path: str, problems: Sequence[str]) -> None:
    """What ``mjgate serve`` prints for an invalid config: a header, then one line per
    problem, on standard error."""
    print(f"mjgate: invalid config {path}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def running_config() -> Config:
    """The config the gateway runs: loaded from ``MJGATE_CONFIG`` on first use, where an
    invalid one ends the process with status 2; later, the one the last reload accepted."""
    if not _running:
        path = config_path()
        try:
            _running.append(load_config(path))
        except ConfigError as exc:
            report_invalid(path, exc.problems)
            sys.exit(2)
    return _running[0]


def config_address(config: Config) -> str:
    """``server.host:server.port`` as gunicorn reads a bind address."""
    host = config.server.host
    return f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"


def bind_address(config: Config) -> str:
    """Where to listen: ``MJGATE_BIND`` when set, otherwise the config's address."""
    return os.environ.get(BIND_ENV) or config_address(config)


def report_bind(server: Any) -> None:
    """A warning when the master listens elsewhere than the config says."""
    configured = config_address(running_config())
    if server.cfg.bind != [configured]:
        server.log.warning(
            "listening on %s (MJGATE_BIND or --bind), not on %s (server.host:server.port)",
            ", ".join(server.cfg.bind),
            configured,
        )


def check_reloads(server: Any) -> None:
    """Make SIGHUP check the config before gunicorn reloads.

    gunicorn has no hook that can refuse a reload: its reload re-reads its settings, opens
    the new address, starts new workers and stops the old ones, and exits when it cannot
    listen. So the arbiter's ``reload`` is wrapped: the file is read first and, when the
    config is valid and its address can be had, it becomes the config the new workers
    serve; otherwise each problem is logged and nothing else happens.
    """
    reload = server.reload

    def checked_reload() -> None:
        path = config_path()
        try:
            config = load_config(path)
        except ConfigError as exc:
            problems = exc.problems
        else:
            problems = _cannot_listen(server, config)
        for problem in problems:
            server.log.error("reload of %s refused, the running config stays: %s", path, problem)
        if not problems:
            _running[:] = [config]
            reload()

    server.reload = checked_reload


def _cannot_listen(server: Any, config: Config) -> list[str]:
    """A new address that another process holds: gunicorn's reload would close the old
    listeners, fail to open the new one and exit."""
    bind = server.cfg.bind
    if bind != [bind_address(running_config())] or bind == [bind_address(config)]:
        return []  # --bind holds the address, or it does not change
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        return [f"server: cannot listen on {config_address(config)}: {exc.strerror or exc}"]
    return []


def worker_app() -> Starlette:
    """The app a gunicorn worker serves (``wsgi_app``), built from the master's config."""
    # Imported in the worker: the app imports prometheus-client, which must not be loaded
    # in the master before the configuration has set PROMETHEUS_MULTIPROC_DIR.
    from gateway.app import create_app
    from gateway.logs import configure_logging, secrets_of

    if not _running:
        raise RuntimeError("gateway.master:worker_app() runs under gunicorn -c gunicorn.conf.py")
    config = _running[0]
    configure_logging(config.logging, secrets_of(config))
    return create_app(config)
