"""The package's public surface is exactly what ``gateway.__all__`` names, and it works."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

import gateway
from gateway.app import create_app
from gateway.config import Config, ConfigError
from gateway.configfile import load_config

EXPORTED = {"Config", "ConfigError", "__version__", "create_app", "load_config"}


def test_exported_members_are_exactly_the_public_surface() -> None:
    assert set(gateway.__all__) == EXPORTED
    public = {name for name in dir(gateway) if not name.startswith("_")} | {"__version__"}
    assert public == EXPORTED


def test_exported_members_are_the_real_objects() -> None:
    assert gateway.create_app is create_app
    assert gateway.load_config is load_config
    assert gateway.Config is Config
    assert gateway.ConfigError is ConfigError
    assert gateway.__version__ == version("mjgate")


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = gateway.no_such_thing


def test_importing_the_package_loads_nothing_heavy() -> None:
    """Names load on first use: ``import gateway`` alone opens no app, store or client code."""
    code = (
        "import sys, gateway; "
        "print(','.join(m for m in ('gateway.app', 'gateway.store', 'starlette') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
