"""mjgate: a self-hosted caching gateway for Midjourney-proxy-style task APIs.

The public surface is small: build an app from a config and serve it with any ASGI server::

    from gateway import create_app, load_config

    app = create_app(load_config("config.yaml"))

Names are loaded on first use, so ``python -m gateway.sim`` or a sub-module import does not
pull in the whole gateway.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import create_app
    from gateway.config import Config, ConfigError
    from gateway.configfile import load_config

__all__ = ["Config", "ConfigError", "__version__", "create_app", "load_config"]

__version__ = version("mjgate")

_LAZY = {
    "Config": "gateway.config",
    "ConfigError": "gateway.config",
    "create_app": "gateway.app",
    "load_config": "gateway.configfile",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
