"""Pure ASGI middleware (no buffering of responses, so streaming and disconnect detection
pass through): Bearer-key check on ``/v1/*`` and ``/admin/*`` and the request body size
limit."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slabserve.server.errors import APIError
from slabserve.server.state import ServerContext

PROTECTED = ("/v1/", "/admin/")  # path prefixes that need the key when one is set


async def _send_error(send: Send, err: APIError, ctx: ServerContext) -> None:
    ctx.metrics.refused(err.status)
    resp = err.response()
    await send({"type": "http.response.start", "status": resp.status_code,
                "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


class GuardMiddleware:
    """401 for ``/v1/*`` and ``/admin/*`` without ``Authorization: Bearer <api_key>`` (when
    a key is set); 413 for a body over ``max_body_bytes`` (declared or actual).  The body is
    read here, bounded, and replayed to the app; later ``receive`` calls (disconnects) pass
    through."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        key = ctx.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    def _authorized(self, scope: Scope) -> bool:
        if self.expected is None or not scope["path"].startswith(PROTECTED):
            return True
        got = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(got, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            err = APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer "
                           "<key>'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
            await _send_error(send, err, self.ctx)
            return
        limit = self.ctx.config.max_body_bytes
        too_large = APIError(413, f"Request body larger than {limit} bytes.",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, too_large, self.ctx)
            return
        body = bytearray()
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _send_error(send, too_large, self.ctx)
                return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
