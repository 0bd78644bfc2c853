"""The engine registry: built-ins, the entry-point group, and the Engine protocol."""

import re
import sys
import textwrap

import pytest

from manualprop import engines
from manualprop.engines import Engine


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """An installed third-party package that declares an engine through the entry point."""
    (tmp_path / "mp_plugin_engine.py").write_text(
        textwrap.dedent("""
        from manualprop.reference.engine import NumpyEngine

        class PluginEngine(NumpyEngine):
            name = "plugin"
    """)
    )
    info = tmp_path / "mp_plugin_engine-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mp-plugin-engine\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[manualprop.engines]\nplugin = mp_plugin_engine:PluginEngine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    engines.unregister("plugin")
    sys.modules.pop("mp_plugin_engine", None)


def test_builtins_come_first():
    assert engines.names()[:3] == ["numpy", "torch", "keras"]


def test_a_package_adds_an_engine_through_the_entry_point(plugin_distribution):
    assert "plugin" in engines.names()
    engine = engines.get("plugin")
    assert engine.name == "plugin" and isinstance(engine, Engine)


def test_every_builtin_satisfies_the_protocol_without_importing_its_framework():
    for name in ("numpy", "torch", "keras"):
        engine = engines.get(name)
        assert isinstance(engine, Engine) and engine.name == name
        reason = engine.unavailable()
        assert reason is None or "install it with" in reason


def test_unknown_engine_names_the_registered_ones():
    with pytest.raises(ValueError, match=re.escape("Unknown engine 'jax'. Registered: numpy, torch, keras")):
        engines.get("jax")
