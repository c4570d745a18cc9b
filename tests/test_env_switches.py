"""The on/off/auto switches of slabserve.env (one reader, ``_on_off_auto``): host math
and the CPU linear layout."""

from __future__ import annotations

import pytest

from slabserve import env

SWITCHES = [("SLABSERVE_HOST_MATH", env.host_math),
            ("SLABSERVE_LINEAR_LAYOUT", env.linear_layout)]


@pytest.mark.parametrize("var,read", SWITCHES)
@pytest.mark.parametrize("raw,want", [(None, None), ("", None), ("auto", None), ("on", True),
                                      ("1", True), ("off", False), ("0", False)])
def test_switch_values(monkeypatch, var, read, raw, want):
    if raw is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, raw)
    assert read() is want


@pytest.mark.parametrize("var,read", SWITCHES)
@pytest.mark.parametrize("raw", ["sometimes", "sideways"])
def test_switch_rejects_garbage(monkeypatch, var, read, raw):
    monkeypatch.setenv(var, raw)
    with pytest.raises(ValueError, match=var):
        read()
