"""Frozen configuration of the HTTP layer, built at the edge (``slabserve serve``, tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP server needs besides the serving loop.

    ``api_key`` None = no authentication; otherwise every ``/v1/*`` and ``/admin/*`` route
    needs ``Authorization: Bearer <api_key>`` (``/health``, ``/ready`` and ``/metrics``
    stay open).  ``admin_endpoints`` serves ``/admin/*`` (``server.admin``: switching the
    decode attention path at run time, for benchmarks); off, those routes are 404.
    ``max_body_bytes`` bounds a request body (413 beyond it).  ``shutdown_timeout`` is how
    long in-flight requests may run after SIGTERM before they are ended.  ``max_n`` bounds
    the choices of one request (n times the number of prompts)."""

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

    def __post_init__(self) -> None:
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
