"""What every route shares: the serving, tokenizer, config, metrics, and the server's
lifecycle (starting -> ready -> draining)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from slabserve.scheduler.api import RequestError, ServingLoop
from slabserve.server import generation
from slabserve.server.codec import TextCodec
from slabserve.server.config import ServerConfig
from slabserve.server.errors import APIError, from_engine
from slabserve.server.metrics import ServerMetrics

log = logging.getLogger("slabserve.server")


class EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` runs however the response ends, even when
    the client leaves before the body iterator has started (then nothing else would
    abort the admitted choices)."""

    def __init__(self, events, on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


@dataclass(frozen=True)
class Job:
    """Identity of one API response: id, creation time, model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Job:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


class ServerContext:
    """Shared state of one app.  ``ready`` once the serving loop has started; ``draining`` from
    the first shutdown request on (new requests get 503 ``shutting_down``)."""

    def __init__(self, serving: ServingLoop, config: ServerConfig, codec: TextCodec) -> None:
        self.serving = serving
        self.config = config
        self.codec = codec
        self.model_name = config.served_model_name or serving.model_name
        self.max_context = int(serving.max_context)
        self.metrics = ServerMetrics(serving, self.model_name)
        self.created = int(time.time())
        self.ready = False
        self.draining = False
        self._drain: asyncio.Task | None = None

    # ---- admission -------------------------------------------------------------------
    def check_admitting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable_error",
                           None, "shutting_down")
        if not self.ready:
            raise APIError(503, "the serving loop is not ready yet", "service_unavailable_error",
                           None, "not_ready", {"Retry-After": str(self.config.retry_after_s)})

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is None, the served name, or one of its aliases (other
        ``--served-model-name`` values, the ``--model`` path)."""
        known = (self.model_name, self.serving.model_name, *self.config.model_aliases)
        if model is not None and model not in known:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.model_name}'.", param="model", code="model_not_found")

    def check_fanout(self, count: int) -> None:
        if count > self.config.max_n:
            raise APIError(400, f"n times the number of prompts is {count}; at most "
                           f"{self.config.max_n} choices per request", param="n",
                           code="invalid_value")

    async def admit(self, choices: list[generation.Choice]) -> None:
        try:
            await generation.admit(self.serving, choices)
        except RequestError as e:
            raise from_engine(e, self.config.retry_after_s) from None

    # ---- responses -------------------------------------------------------------------
    def stream(self, events, choices: list[generation.Choice]) -> StreamingResponse:
        return EventStream(events, lambda: generation.abort_all(self.serving, choices, True))

    async def collect(self, request: HTTPRequest, choices: list[generation.Choice]) -> bool:
        """Run the choices to their end; False if the client went away first (the
        choices are then aborted).  An serving failure is a 500, an abort (shutdown) a 503."""
        done = await generation.while_connected(
            request.receive, generation.collect(self.serving, choices))
        if done is None:
            return False
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            raise APIError(500, failed[0].error or "generation failed", "server_error",
                           None, "engine_error")
        if any(c.finish_reason == "abort" for c in choices):
            raise APIError(503, "the request was ended by the server shutting down",
                           "service_unavailable_error", None, "shutting_down")
        return True

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self.serving.start()
        self.ready = True
        log.info("serving %s (context %d tokens)", self.model_name, self.max_context)

    def begin_drain(self) -> asyncio.Task:
        """Stop admitting and ask the serving loop to finish in-flight requests within
        ``shutdown_timeout`` (then end them).  Idempotent; returns the drain task."""
        if self._drain is None:
            self.draining = True
            log.info("draining: in-flight requests have %.1f s", self.config.shutdown_timeout)
            self._drain = asyncio.ensure_future(
                self.serving.shutdown(self.config.shutdown_timeout))
        return self._drain
