"""The CPU thread count of a run, chosen deliberately.

PyTorch's default is one intra-op thread per core. On a machine whose cores are shared with another job that is the
worst choice: each parallel region waits at a barrier for the thread whose core is busy, and a training epoch on 2
cores with one competing process ran about 5x slower than with one thread (``bench`` measures it side by side). Half
the usable cores (at least 1, at most 8) leaves room for a neighbour and loses little when the machine is idle: the
model's matrices (batch 64, hidden 256) are too small for many threads to pay off.
"""

from __future__ import annotations

import os

MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


MAX_THREADS = 1024  # more is a typo; onnxruntime's options overflow a 32-bit int and torch stalls


def default_threads() -> int:
    """Half the usable cores, at least 1 and at most :data:`MAX_DEFAULT_THREADS`."""
    return max(1, min(MAX_DEFAULT_THREADS, usable_cores() // 2))


def resolve_threads(requested: int | None) -> tuple[int, str]:
    """(threads, where the number came from): the flag, else ``OMP_NUM_THREADS``, else :func:`default_threads`."""
    if requested is not None:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return default_threads(), f"default: half of {usable_cores()} usable cores"
