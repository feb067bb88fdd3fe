"""A bounded pool for decoding request images, apart from Starlette's threadpool.

Decoding a request's encoded images is the one CPU-heavy step of the request path. It runs
here, on ``decode_workers()`` threads, with at most ``TMC_DECODE_QUEUE_SIZE`` requests waiting
for one; a request beyond that is refused at once with 503 (``OverloadedError``) instead of
queueing. Everything else (text, tensors, nested-array images, health checks) never enters this
pool, so a few huge image requests cannot starve it: at most ``workers + queue`` of Starlette's
threads (40) wait here, which ``decode_workers() <= 8`` and ``TMC_DECODE_QUEUE_SIZE <= 24``
keep well under 40.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from app.errors import OverloadedError

T = TypeVar("T")
P = ParamSpec("P")
MAX_WORKERS = 8


def decode_workers() -> int:
    """Half the CPUs this process may use, at least one, at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 2
    return max(1, min(MAX_WORKERS, cpus // 2))


class DecodePool:
    def __init__(self, queue_size: int, workers: int | None = None) -> None:
        """Threads start on first use: a service that never decodes an image costs nothing."""
        workers = decode_workers() if workers is None else workers
        self.workers, self.queue_size = workers, queue_size
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="tmc-decode")
        self._slots = threading.BoundedSemaphore(workers + queue_size)  # running + waiting

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the pool and wait for it (on the calling thread), or raise
        OverloadedError at once when every worker is busy and the queue is full."""
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"image decoding is saturated ({self.workers} decoding, {self.queue_size} "
                "waiting; TMC_DECODE_QUEUE_SIZE); retry later")
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future.result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

