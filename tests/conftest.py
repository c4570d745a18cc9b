import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# OpenBLAS for MLX's CPU backend in the test process too (loaded before mlx is imported;
# a no-op where it is absent or another backend is in use).
from slabserve import blas  # noqa: E402

blas.prepare_process()

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Embedded models and profiles go to a per-session folder unless one is set."""
    if "SLABSERVE_CACHE_DIR" not in os.environ:
        os.environ["SLABSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("sscache"))
    yield


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def client(srv, request):
    """The openai SDK against the module's live server ``srv`` (server_fixtures.serve);
    the module's ``CLIENT_TIMEOUT`` (seconds, default 60) bounds each request."""
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0,
                         timeout=_timeout(request))


@pytest.fixture(scope="module")
def http(srv, request):
    """httpx against the module's live server ``srv``; ``CLIENT_TIMEOUT`` as for ``client``."""
    import httpx

    with httpx.Client(base_url=srv.url, timeout=_timeout(request)) as c:
        yield c


def _timeout(request) -> float:
    return getattr(request.module, "CLIENT_TIMEOUT", 60)
