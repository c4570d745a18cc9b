"""Handing a result from the engine thread to an asyncio future on its own loop."""

from __future__ import annotations

import asyncio


def settle(fut: asyncio.Future, result: object, error: BaseException | None) -> None:
    """Resolve ``fut`` on its own loop (from the engine thread); a caller that left or a
    closed loop is ignored."""

    def resolve() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    try:
        fut.get_loop().call_soon_threadsafe(resolve)
    except RuntimeError:  # loop closed
        pass
