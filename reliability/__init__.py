"""Reliability drivers: soak, overload and shutdown checks against a real ``slabserve serve``
subprocess on loopback.

An HTTP client only: nothing here imports the engine, the scheduler, attention or MLX.
The server is observed from outside, through ``/health``, ``/metrics`` and
``/proc/PID/status``.
"""
