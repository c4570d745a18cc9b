"""One rank of ``slabserve serve`` under ``mlx.launch``: tensor parallel (or pipeline parallel,
``--pipeline``) over the ranks of an MLX distributed group (engine/distributed.py has the
protocol, engine/pipeline.py the stages; docs/distributed.md the use).

Rank 0 builds the serving loop and serves HTTP exactly as a single process does; every other
rank loads its shard (or its layers) and follows rank 0's steps, never binding a port.  What
the process does around that lives here, in the composition root:

  * SIGINT / SIGTERM to rank 0 drain as in one process (``serve.DrainingServer``), then rank 0
    sends ``stop`` and every rank exits 0;
  * the launcher ending (SIGTERM kills ``mlx.launch`` at once and re-parents the ranks): each
    rank sees its parent change; rank 0 then drains as on SIGTERM, the others wait for its
    ``stop``.  Their output pipes went with the launcher, so output goes to /dev/null;
  * ranks > 0 ignore SIGINT (a terminal's Ctrl-C reaches every local rank; rank 0 decides),
    and every rank ignores SIGHUP (a remote rank's ssh session ending is the parent watch's
    business), so one signal never tears the group apart mid-step;
  * a fault (a rank died or hangs, ``engine.distributed``): one CRITICAL line naming it, then
    exit ``EXIT_GROUP_LOST`` (3): rank 0 after ``FAULT_GRACE_S`` so the failed requests'
    error chunks go out, the others at once.  ``mlx.launch`` then ends the remaining ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("slabserve.distributed")

FAULT_GRACE_S = 2.0


def serve_rank(group, args, server_cfg, serve_cfg, selector,
               serve_http: Callable[..., int]) -> int:
    """Run this rank until the server ends; its exit status (0 after a drain, 2 for a
    refused configuration, ``EXIT_GROUP_LOST`` after a fault)."""
    from slabserve.build import build_sharded
    from slabserve.engine.distributed import EXIT_GROUP_LOST, DistConfig

    rank = group.rank()
    if args.calibrate:
        print("slabserve serve: --calibrate runs in one process: run `slabserve calibrate "
              "--geometry Q/KV/HEAD_DIM` with the per-rank head counts first", file=sys.stderr)
        return 2
    for sig in (signal.SIGHUP,) + ((signal.SIGINT,) if rank else ()):
        signal.signal(sig, signal.SIG_IGN)
    on_fault = fault_handler(rank, FAULT_GRACE_S if rank == 0 else 0.0, EXIT_GROUP_LOST)
    watch_parent(_drain_self if rank == 0 else _nothing)
    try:
        dist = DistConfig(timeout_s=args.distributed_timeout)
        role = build_sharded(serve_cfg, group, dist, on_fault, selector, args.pipeline)
    except (ValueError, OSError) as e:  # the same on every rank: each refuses, with why
        print(f"slabserve serve: {e}", file=sys.stderr)
        return 2
    mode = "pipeline parallel" if args.pipeline else "tensor parallel"
    if role.follower is not None:
        log.info("%s: following rank 0", mode)
        return role.follower.run()
    log.info("%s over %d ranks: rank 0 serves HTTP and plans every step", mode, group.size())
    try:
        code = serve_http(role.loop, server_cfg)
    finally:
        role.leader.stop()
    return EXIT_GROUP_LOST if role.leader.fault else code


def fault_handler(rank: int, grace_s: float, code: int) -> Callable[[str], None]:
    """``on_fault`` for this rank: log the reason once, then end the process with ``code``
    after ``grace_s`` (``os._exit``: a thread blocked in a collective cannot be joined)."""
    fired = threading.Event()

    def on_fault(reason: str) -> None:
        if fired.is_set():
            return
        fired.set()
        log.critical("%s; ending this rank with exit status %d", reason, code)
        if grace_s <= 0:
            os._exit(code)
        threading.Timer(grace_s, os._exit, (code,)).start()

    return on_fault


def watch_parent(on_gone: Callable[[], None], period_s: float = 0.5) -> None:
    """Call ``on_gone`` once this process's parent (the launcher) has ended, after pointing
    stdout and stderr at /dev/null (their pipes ended with it)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        on_gone()

    threading.Thread(target=watch, name="slabserve-parent-watch", daemon=True).start()


def _drain_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # serve.DrainingServer drains, as on SIGTERM


def _nothing() -> None:
    """A follower outlives its launcher until rank 0's ``stop`` (or a fault)."""
