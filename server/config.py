"""Frozen configuration of the HTTP layer, built at the edge (``slabserve serve``, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP server needs besides the serving loop.

    ``api_key`` None = no authentication; otherwise every ``/v1/*`` and ``/admin/*`` route
    needs ``Authorization: Bearer <api_key>`` (``/health``, ``/ready`` and ``/metrics``
    stay open).  ``admin_endpoints`` serves ``/admin/*`` (``server.admin``: switching the
    decode attention path at run time, for benchmarks); off, those routes are 404.
    ``max_body_bytes`` bounds a request body (413 beyond it).  ``shutdown_timeout`` is how
    long in-flight requests may run after SIGTERM before they are ended.  ``max_n`` bounds
    the choices of one request (n times the number of prompts).  ``model_aliases``: other
    names a request may give the model by (``model_aliases`` below).
    ``tool_call_parser``: the tool-call format (``server.toolcalls``); ``auto`` picks it
    from the chat template."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    shutdown_timeout: float = 30.0
    served_model_name: str | None = None
    retry_after_s: int = 1
    max_n: int = 16
    log_level: str = "info"
    admin_endpoints: bool = False
    model_aliases: tuple[str, ...] = ()
    tool_call_parser: str = "auto"

    def __post_init__(self) -> None:
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.shutdown_timeout < 0 or self.retry_after_s < 0:
            raise ValueError("shutdown_timeout and retry_after_s must be >= 0")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")


def model_aliases(model: str | None, served_names: Sequence[str] = ()) -> tuple[str, ...]:
    """Names besides the first served name that a request may use: the other served names,
    and the ``--model`` argument as given and as an absolute path (what vLLM accepts)."""
    names = list(served_names[1:])
    if model:
        names.append(model)
        if not model.startswith("embedded:"):
            names.append(str(Path(model).expanduser().resolve()))
            names.append(model.rstrip("/"))
    return tuple(dict.fromkeys(n for n in names if n))
