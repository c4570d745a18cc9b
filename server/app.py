"""The FastAPI app: ``create_app(serving, config)`` (``serving``: the ``ServingLoop``) wires
loop's lifecycle (started in the app's lifespan, drained at its end)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from slabserve.scheduler.api import ServingLoop
from slabserve.server import admin, chat, completions, errors
from slabserve.server.codec import TextCodec
from slabserve.server.config import ServerConfig
from slabserve.server.errors import APIError
from slabserve.server.middleware import GuardMiddleware
from slabserve.server.state import ServerContext

router = APIRouter()


def _blas_status() -> dict:
    """What serves MLX's matrix products (``slabserve.blas.status``)."""
    from slabserve import blas

    return blas.status()


def _model_card(ctx: ServerContext) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created,
            "owned_by": "slabserve", "max_model_len": ctx.max_context}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request.app.state.ctx)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(model_id)
    return _model_card(ctx)


@router.get("/health")
async def health(request: Request) -> dict:
    """Liveness: the process answers.  Says whether it is ready or draining."""
    ctx: ServerContext = request.app.state.ctx
    stats = ctx.serving.stats()
    return {"status": "ok", "ready": ctx.ready and not ctx.draining,
            "draining": ctx.draining, "model": ctx.model_name, "blas": _blas_status(),
            "kv_capacity_tokens": stats.kv_capacity_tokens, "kv_dtype": stats.kv_dtype,
            "kv_blocks_total": stats.kv_blocks_total}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when the serving loop is started and new requests are admitted, else 503."""
    ctx: ServerContext = request.app.state.ctx
    ctx.check_admitting()
    return JSONResponse({"status": "ready", "model": ctx.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def create_app(serving: ServingLoop, config: ServerConfig | None = None,
               tokenizer: Any = None, vocab_size: int | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``serving``.  ``tokenizer`` defaults to
    ``serving.tokenizer`` (an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer);
    ``vocab_size`` (the model's, which may exceed the tokenizer's) defaults to the
    tokenizer's length.  The serving loop is started when the app starts and drained (with
    ``config.shutdown_timeout``) when it stops."""
    config = config or ServerConfig()
    codec = TextCodec(serving.tokenizer if tokenizer is None else tokenizer, vocab_size)
    ctx = ServerContext(serving, config, codec)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctx.start()
        try:
            yield
        finally:
            await ctx.begin_drain()

    app = FastAPI(title="slabserve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.ctx = ctx
    errors.install(app, on_error=ctx.metrics.refused)
    app.include_router(router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    if config.admin_endpoints:  # otherwise /admin/* is an unknown URL (404)
        app.include_router(admin.router)
    app.add_middleware(GuardMiddleware, ctx=ctx)
    return app


__all__ = ["APIError", "ServerConfig", "create_app"]
