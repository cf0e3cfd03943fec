"""Execution engines: run one picklable function over many work items, yielding results as they finish.

- ``local``: a process pool of ``workers`` processes (in-process when workers == 1, which keeps
  tracebacks and profiles simple). ``initializer(*initargs)`` runs once in each process that runs
  items: the driver as soon as the engine exists when workers == 1, else each pool process when the
  pool starts.

Both engines take items from a stream as they go and keep only a window of them in flight (a few per
worker), so the item stream (a listing of millions of files) is never held in memory.
- ``ray``: the same function as Ray tasks, on the cluster at ``ray_address`` (or a local Ray started
  on demand). Submission is windowed so that millions of items never sit in the object store at once.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any

ITEMS_PER_WORKER = 2  # in flight per local worker: one running, one queued behind it


def _call(fn: Callable, item: Any) -> Any:
    return fn(item)


class LocalEngine:
    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers = workers
        self._pool = None
        self._init = (initializer, initargs)
        if initializer is not None and workers == 1:
            initializer(*initargs)

    def run(self, fn: Callable, items: Iterable) -> Iterator:
        if self.workers == 1:
            yield from map(fn, items)
            return
        if self._pool is None:
            # spawn: workers start clean (no inherited locks or threads from the parent)
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, *self._init)
        finished: queue.SimpleQueue = queue.SimpleQueue()  # (ok, result or exception), in finishing order
        in_flight = 0
        for item in items:
            self._pool.apply_async(fn, (item,), callback=lambda r: finished.put((True, r)),
                                   error_callback=lambda e: finished.put((False, e)))
            in_flight += 1
            if in_flight >= ITEMS_PER_WORKER * self.workers:
                in_flight -= 1
                yield _result(finished.get())
        for _ in range(in_flight):
            yield _result(finished.get())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def _result(outcome: tuple[bool, Any]) -> Any:
    ok, value = outcome
    if not ok:
        raise value
    return value


class RayEngine:
    def __init__(self, address: str | None, workers: int):
        import ray  # imported here: Ray is heavy and only this engine needs it

        self.ray = ray
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": workers}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        self.window = 4 * max(1, int(ray.cluster_resources().get("CPU", workers)))
        self._remote = ray.remote(num_cpus=1, max_retries=3)(_call)

    def run(self, fn: Callable, items: Iterable) -> Iterator:
        ray = self.ray
        fn_ref = ray.put(fn)
        pending = []
        for item in items:
            pending.append(self._remote.remote(fn_ref, item))
            if len(pending) >= self.window:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    def close(self) -> None:
        pass  # a Ray cluster outlives the ingest; a local Ray stops with the process


def make_engine(engine: str, workers: int, ray_address: str | None = None, initializer: Callable | None = None,
                initargs: tuple = ()):
    """The engine; ``initializer`` is a start-up hint for local processes (Ray workers are long-lived anyway)."""
    return RayEngine(ray_address, workers) if engine == "ray" else LocalEngine(workers, initializer, initargs)
