"""Admin routes, served only with ``ServerConfig.admin_endpoints`` (``slabserve serve
--admin-endpoints``) and behind the API key when one is set (``server.middleware``).

``GET /admin/attention-path`` -> ``{"path": "auto"|"native"|"gather"}``: the decode
attention path setting in force.  ``POST /admin/attention-path`` with ``{"path": ...}``
switches it from the next step on (steps in flight finish on the old one) and
answers once it is applied: ``{"previous": ..., "path": ...}``.  ``/metrics``'
``attention_path_total`` then counts ``env_native`` / ``env_gather`` (forced) or the auto
reasons.  For benchmarks (``slabserve loadtest --compare --one-server``): comparing paths
inside one process removes the process-to-process spread of separate servers.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request

from slabserve.scheduler.api import AttentionPath, RequestError
from slabserve.server.errors import APIError, from_engine
from slabserve.server.state import ServerContext

router = APIRouter()


class AttentionPathBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields: 400, as the API's bodies

    path: AttentionPath


def _no_switch(ctx: ServerContext) -> APIError:
    return APIError(404, f"the loop serving '{ctx.model_name}' has no switchable "
                    "attention path", code="unknown_url")


@router.get("/admin/attention-path")
async def get_attention_path(request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    path = ctx.serving.attention_path()
    if path is None:
        raise _no_switch(ctx)
    return {"path": path}


@router.post("/admin/attention-path")
async def set_attention_path(body: AttentionPathBody, request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    if ctx.serving.attention_path() is None:
        raise _no_switch(ctx)
    try:
        previous = await ctx.serving.set_attention_path(body.path)
    except RequestError as e:
        raise from_engine(e, ctx.config.retry_after_s) from None
    return {"previous": previous, "path": body.path}
