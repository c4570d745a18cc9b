"""The contract between the HTTP server and the serving loop: plain data, no MLX, no HTTP.

``server/`` submits a ``Request`` to a ``ServingLoop`` and iterates ``Delta``s until one
carries a ``finish_reason``.  Expected refusals are ``RequestError`` with a ``kind`` the
server maps to a status code (queue_full -> 429, too_long/invalid -> 400,
shutting_down -> 503).

Optional: ``attention_path`` / ``set_attention_path`` read and switch which decode
attention path the engine runs (``AttentionPath``: auto, or one forced path), applied
between two engine steps; an engine without a switch answers None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from slabserve.engine.step import (
    ATTENTION_PATHS,
    AttentionPath,
    GrammarSpec,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "ATTENTION_PATHS", "AttentionPath", "Delta", "ErrorKind", "FinishReason", "GrammarSpec",
    "Request", "RequestError", "SamplingParams", "ServingLoop", "ServingStats", "TokenLogprob",
]

FinishReason = Literal["stop", "length", "abort", "error"]
ErrorKind = Literal["queue_full", "too_long", "invalid", "shutting_down", "kv_capacity"]


@dataclass(frozen=True)
class Request:
    """``cache_salt``: requests reuse each other's cached prompt blocks only when their
    salts are equal (tenants keep their prefix caches apart)."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_salt: str | None = None


@dataclass(frozen=True)
class Delta:
    """New output since the previous delta.  ``text`` is the detokenized increment with
    stop strings removed; the last delta has ``finish_reason`` set."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class RequestError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ServingStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    prompt_tokens: int
    generated_tokens: int
    integrity_checks: int = 0
    integrity_failures: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found cached
    prefix_cache_blocks: int = 0  # blocks cached now (in use or evictable)
    kv_dtype: str = ""  # the KV pool's element type
    kv_block_size: int = 0
    decode_steps: int = 0  # engine steps that decoded only (no prefill token)
    decode_step_seconds: float = 0.0  # their time, planning to handing the deltas over
    # of it, per phase (steplog.PHASES: schedule, forward, sample, wait, update, deliver)
    decode_phase_seconds: tuple[tuple[str, float], ...] = ()
    decode_host_cpu_seconds: float = 0.0  # the engine thread's CPU time outside the wait
    decode_graph_traces: int = 0  # compiled decode step graphs traced (engine/step_graph.py)
    # (upper bound in seconds, decode-only steps at most that long), cumulative
    decode_step_buckets: tuple[tuple[float, int], ...] = ()
    decode_steps_ahead: int = 0  # of the decode-only steps, those submitted ahead (async)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pool's budget holds."""
        return self.kv_blocks_total * self.kv_block_size


class ServingLoop(ABC):
    """What the server sees.  Implementations run model steps off the event loop."""

    model_name: str
    max_context: int

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Admit ``request`` (raising ``RequestError`` when refused) and stream its deltas.
        Breaking out of the iteration (or cancelling the consuming task) aborts it."""

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    async def check_constraint(self, spec: GrammarSpec) -> None:
        """Raise ``RequestError`` ``invalid`` (with the reason) unless the engine can
        enforce ``spec`` (a grammar that does not compile, or an engine without grammar
        support).  Compiling may take a while; the compiled grammar is cached, so the
        request that follows starts at once."""
        raise RequestError("invalid", "this engine cannot constrain its output")

    @abstractmethod
    def stats(self) -> ServingStats: ...

    def attention_path(self) -> AttentionPath | None:
        """The decode attention path setting now in force; None when this engine cannot
        switch paths (then ``set_attention_path`` is refused too)."""
        return None

    def attention_path_counts(self) -> dict[tuple[str, str], int]:
        """(decode path, reason) -> layer-steps so far, for /metrics (empty: unknown)."""
        return {}

    async def set_attention_path(self, path: AttentionPath) -> AttentionPath:
        """Switch the decode attention path from the next engine step on; returns the
        previous setting.  ``RequestError`` ``invalid`` for an unknown path or an engine
        without a switch, ``shutting_down`` once the engine stops."""
        raise RequestError("invalid", "this engine has no switchable attention path")

    @abstractmethod
    async def shutdown(self, timeout: float) -> None:
        """Stop admitting (``shutting_down``), let running requests finish within
        ``timeout`` seconds, then abort the rest; their streams end with ``abort``."""
