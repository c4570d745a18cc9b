"""slabserve: a continuous-batching, OpenAI-compatible server with a slab-paged KV cache on MLX.

Installed, the wheel holds one package: ``slabserve.server``, ``slabserve.scheduler``,
``slabserve.engine``, ``slabserve.attention``, ``slabserve.kvcache`` (and the tools
``loadtest``, ``reliability``, ``bench``), mapped by pyproject.toml from the repository's
top-level folders.  Run from a source checkout without installing (``PYTHONPATH=.``, as
on a machine with no package index), the repository root is searched for those parts too.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "kvcache" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # source checkout: slabserve.server is <root>/server
