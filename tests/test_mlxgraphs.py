"""MLX's CUDA graph byte budget (slabserve.mlxgraphs, docs/adr/0015-cuda-graph-budget.md):
set by the CLI before MLX is imported, on Linux only, never over the user's own value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from slabserve.mlxgraphs import UNBOUNDED_MB, graph_env

ROOT = Path(__file__).resolve().parents[1]
VAR = "MLX_MAX_MB_PER_BUFFER"


def test_unbounded_on_linux_when_unset():
    assert graph_env(None, "linux") == {VAR: str(UNBOUNDED_MB)}
    assert UNBOUNDED_MB < 2**31  # MLX parses it into an int


def test_user_value_and_other_platforms_left_alone():
    assert graph_env("1000", "linux") == {}
    assert graph_env("", "linux") == {}  # set, even if empty: the user's
    assert graph_env(None, "darwin") == {}
    assert graph_env(None, "win32") == {}


def _cli(code: str, **extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k != VAR}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**e, **extra},
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


INFO = """
    import contextlib, io, json, sys
    from slabserve import cli, mlxgraphs
    seen = {}
    real = mlxgraphs.graph_env
    def spy(current, platform):
        seen["mlx_imported"] = "mlx.core" in sys.modules
        return real(current, platform)
    mlxgraphs.graph_env = spy
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["info", "--json"])
    info = json.loads(buf.getvalue())
    print(json.dumps({"rc": rc, "seen": seen, "budget": info["mlx_max_mb_per_buffer"]}))
"""


def test_cli_sets_the_budget_before_mlx_is_imported():
    out = _cli(INFO)
    assert out["rc"] == 0
    assert out["seen"] == {"mlx_imported": False}
    expected = str(UNBOUNDED_MB) if sys.platform.startswith("linux") else None
    assert out["budget"] == expected


def test_cli_keeps_the_users_budget():
    assert _cli(INFO, **{VAR: "1000"})["budget"] == "1000"
