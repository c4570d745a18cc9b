"""HTTP load tester for OpenAI-compatible servers (``slabserve loadtest``).

An HTTP client only: it never imports mlx, the engine, the scheduler or attention; servers
(``slabserve serve``, ``mlx_lm.server``) and the embedded-model writer run as subprocesses.

Modules: ``sse`` (stream lines -> chunks), ``client`` (one timed streaming request),
``metrics`` (records -> TTFT/ITL/TPOT/E2E percentiles and rates), ``prompts`` (prompts of
exact token length), ``traces`` (attention-path and counter deltas from ``/metrics``),
``runner`` (closed-loop load at one concurrency), ``grid`` (contexts x concurrency, and
``--compare`` over launched servers), ``servers`` (launching them), ``report`` / ``compare``
(JSON, CSV, markdown, PNG, goal checks), ``chat`` / ``chatcompare`` (``--scenario chat``:
multi-turn sessions sharing a system prompt, for prefix caching), ``cli`` (``main(argv)``).
"""
