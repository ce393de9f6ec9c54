"""Where tasks run and how the cores are shared between Dask workers and torch threads.

Today: the local threaded scheduler. The split matters: Dask threads that each run a forward pass
with all cores' worth of torch threads oversubscribe the machine and run slower than either alone.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_plan(cores: int, workers: int | None, torch_threads: int | None, device_type: str) -> tuple[int, int]:
    """``(dask workers, torch threads per forward pass)`` with ``workers * torch_threads <= cores``.

    On the CPU two workers let one task read and decode while another computes; on a GPU the
    device does the arithmetic, so two workers keep it fed and one torch thread each is enough.

    >>> thread_plan(2, None, None, "cpu"), thread_plan(16, None, None, "cpu"), thread_plan(16, 4, None, "cpu")
    ((2, 1), (2, 8), (4, 4))
    """
    if device_type != "cpu":
        return (workers or 2, torch_threads or 1)
    if workers is None:
        workers = max(1, min(2, cores // (torch_threads or 1)))
    if torch_threads is None:
        torch_threads = max(1, cores // workers)
    return workers, torch_threads
