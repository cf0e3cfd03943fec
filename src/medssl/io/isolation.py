"""Decode untrusted files in a child process with a time and a memory budget.

A 100-million-file archive holds files that make native decoders panic, crash, loop forever or
allocate without bound. Python cannot recover from a segfault or interrupt a C loop, so the readers
run in a separate worker process (``python -m medssl.io.isolation``) and the caller (an ingest work
unit, the downstream image loader) only sends requests and waits for answers:

- **time**: an answer that does not come within ``timeout_s`` gets the worker killed; the request
  fails with ``timeout``;
- **memory**: the worker's whole address space is capped (``RLIMIT_AS``) at ``memory_bytes`` (never
  less than what it maps after start-up plus ``MIN_HEADROOM``), so its memory stays within the budget
  and an allocation beyond it fails inside the worker (``MemoryError``
  -> ``too_large``) instead of waking the kernel's OOM killer; readers check the same budget from
  the header before decoding, so the cap is the last line of defence;
- **crashes**: a worker that dies (segfault, abort, killed) fails the request with
  ``decoder_crash``; a fresh worker is started for the next request, so the rest of a work unit
  goes on.

The protocol carries no pickles: a request is JSON, an answer is a JSON header followed by raw byte
blobs (encoded images, arrays), each message prefixed by its length. A worker serves the functions of
one ``medssl`` module, imported at start-up (before its memory is capped and before it reports ready,
so imports never count against a file's budgets); each takes the request's JSON arguments and returns
``(json_result, [blobs])``. Everything the worker writes to stdout or stderr is discarded: decoders
print header values, which must not reach a console or log.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from medssl.io.source import Rejected

_LENGTH = struct.Struct("<Q")
_READY = b"ready"
# A budget below what the worker maps after start-up (~200 MB of libraries) still leaves it this much.
MIN_HEADROOM = 64 << 20
_STARTUP_S = 120.0  # imports on a cold or network file system; not counted in any file's time budget
# Decoder libraries should not start thread pools in a worker that decodes one file at a time. And glibc
# should keep freed decode buffers (up to 32 MiB each, 128 MiB in all) for the next file: with its
# defaults the worker gave them back after every file and faulted them in again (measured on 512 px
# JPEGs: ~1,500 page faults and +35% decode time per file, against ~0 in a long-lived process).
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


@dataclass(frozen=True)
class Budget:
    timeout_s: float = 300.0
    memory_bytes: int = 4 << 30


class IsolatedWorker:
    """One decode worker process serving ``module``, started on first use and replaced after every fault."""

    def __init__(self, budget: Budget, module: str):
        if not module.startswith("medssl."):
            raise ValueError(f"a decode worker serves medssl modules only, not {module!r}")
        self.budget = budget
        self.module = module
        self._proc: subprocess.Popen | None = None
        self._env: dict[str, str] = {}  # the environment the running worker started with
        self._ready = False
        self.starts = 0
        self.faults = 0
        self.peak_rss_bytes = 0  # the largest resident set any of this object's workers reached
        self.cpu_seconds = 0.0   # CPU time its workers reported, all of them together
        self._proc_cpu = 0.0     # ... of which the current worker's
        self.storage_read_bytes = 0  # bytes its workers had read from storage (not the page cache)
        self._proc_read = 0          # ... of which the current worker's

    def call(self, function: str, args: dict) -> tuple[dict, list[bytes]]:
        """Run ``module.function(args)`` in the worker. A request that costs the worker rejects its file:
        ``Rejected`` with code ``timeout``, ``too_large`` or ``decoder_crash``."""
        proc = self._ensure_started()
        deadline = time.monotonic() + self.budget.timeout_s
        try:
            _write_message(proc.stdin, json.dumps({"function": function, "args": args}).encode())
            header = json.loads(self._read_message(deadline))
            blobs = [self._read_message(deadline) for _ in range(header["blobs"])]
        except _Timeout:
            self._stop()
            raise self._fault("timeout", f"no answer within file_timeout_s={self.budget.timeout_s:g} s; "
                                         "the decode worker was stopped") from None
        except (EOFError, BrokenPipeError, ConnectionResetError, ValueError):
            raise self._fault(*self._death_reason()) from None
        self.peak_rss_bytes = max(self.peak_rss_bytes, header["peak_rss_bytes"])
        self.cpu_seconds += header["cpu_seconds"] - self._proc_cpu
        self._proc_cpu = header["cpu_seconds"]
        self.storage_read_bytes += header["read_bytes"] - self._proc_read
        self._proc_read = header["read_bytes"]
        if header["retire"]:  # the worker ends itself after this answer; the next call starts a fresh one
            self._stop()
        if "error" in header:
            raise self._fault(*header["error"])
        return header["result"], blobs

    def close(self) -> None:
        self._stop()

    def follow_environment(self) -> None:
        """Stop a running worker if this process's environment changed since it started (say, AWS
        credentials set in a notebook after an earlier ingest): the next call starts one that sees it."""
        if self._proc is not None and self._env != os.environ:
            self._stop()

    def _fault(self, code: str, detail: str) -> Rejected:
        self.faults += 1
        return Rejected(code, detail)

    def start(self) -> None:
        """Start a worker now without waiting for it (it imports while the caller does other work)."""
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            # The worker must import this very medssl, also when it was found through sys.path edits.
            package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
            self._env = dict(os.environ)
            env = {**os.environ, **_WORKER_ENV, "PYTHONPATH": path}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "medssl.io.isolation", self.module, str(self.budget.memory_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                start_new_session=True)  # a Ctrl-C in the terminal reaches the caller, which stops the worker
            self._ready = False
            self.starts += 1
            self._proc_cpu = 0.0
            self._proc_read = 0
            _widen_pipe(self._proc.stdout.fileno())

    def _ensure_started(self) -> subprocess.Popen:
        self.start()
        if not self._ready:
            try:
                ready = self._read_message(time.monotonic() + _STARTUP_S)
            except (_Timeout, EOFError):
                ready = None
            if ready != _READY:
                self._stop()
                raise RuntimeError(f"the decode worker ({sys.executable} -m medssl.io.isolation) did not start "
                                   f"within {_STARTUP_S:g} s; is the medssl installation complete?")
            self._ready = True
        return self._proc

    def _read_message(self, deadline: float) -> bytes:
        (n,) = _LENGTH.unpack(self._read_exact(_LENGTH.size, deadline))
        return self._read_exact(n, deadline)

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()
        parts, left = [], n
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _Timeout
            part = os.read(fd, min(left, 1 << 20))
            if not part:
                raise EOFError
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _death_reason(self) -> tuple[str, str]:
        proc = self._proc
        try:
            status = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # the pipe broke but the process lingers: end it
            status = None
        self._stop()
        if status is not None and status < 0:
            sig = signal.Signals(-status).name
            if -status == signal.SIGKILL:  # not sent by us: the kernel's OOM killer, most likely
                return "too_large", "the decode worker was killed by the system (SIGKILL), most likely out of memory"
            return "decoder_crash", f"the decode worker died with {sig} while reading this file"
        return "decoder_crash", f"the decode worker exited (status {status}) while reading this file"

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:  # a broken pipe on close: the worker is gone anyway
                pass


class _Timeout(Exception):
    pass


_shared: dict[tuple[Budget, str], IsolatedWorker] = {}


def shared_worker(budget: Budget, module: str) -> IsolatedWorker:
    """This process's worker for ``budget`` and ``module``, kept across calls (a start costs about half
    a second).

    It needs no explicit shutdown: a worker exits when its caller's end of the pipe closes, which the
    operating system does when the calling process ends, however it ends.
    """
    if (budget, module) not in _shared:
        _shared[budget, module] = IsolatedWorker(budget, module)
    return _shared[budget, module]


def _widen_pipe(fd: int) -> None:
    """Answers carry encoded images of a few hundred KB: a 1 MiB pipe (Linux; 64 KiB by default) passes
    one in a single write instead of a dozen wake-ups of both processes."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (AttributeError, OSError):  # not Linux, or above the system's pipe-max-size: keep the default
        pass


def _write_message(stream, payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


# --- the worker side ------------------------------------------------------------------------------

def _peak_rss_bytes() -> int:
    """This process's own high-water RSS. Not ``ru_maxrss``: Linux carries that over from the parent
    across fork and exec, so a worker started by a large process would report the parent's size."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def _storage_read_bytes() -> int:
    """Bytes this process caused to be read from storage (Linux task I/O accounting; 0 where absent)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return 0


def _usage() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_bytes": _peak_rss_bytes(), "cpu_seconds": own.ru_utime + own.ru_stime,
            "read_bytes": _storage_read_bytes()}


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _cap_address_space(budget: int) -> int:
    """Cap the address space; returns the cap."""
    limit = max(budget, _mapped_bytes() + MIN_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def _answer(fn: Callable, args: dict, budget: int) -> tuple[dict, list[bytes]]:
    try:
        result, blobs = fn(args)
        return {"result": result}, blobs
    except MemoryError:
        return {"error": ["too_large", f"decoding needed more than the memory budget "
                                       f"(max_memory_mb={budget >> 20})"]}, []
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a native panic (pyo3 PanicException) is a BaseException
        return {"error": ["decoder_crash", f"the decoder failed outside any known error ({type(e).__name__})"]}, []


def serve(module_name: str, budget: int) -> None:
    """Worker main loop: read requests from stdin, answer on the original stdout, until stdin closes."""
    answers = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever a decoder prints goes nowhere
    os.dup2(devnull, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when the worker stops
    requests = sys.stdin.buffer
    if not module_name.startswith("medssl."):
        raise SystemExit(f"a decode worker serves medssl modules only, not {module_name!r}")
    module = importlib.import_module(module_name)  # before the address space is measured and capped
    limit = _cap_address_space(budget)
    baseline = _mapped_bytes()
    _write_message(answers, _READY)
    while True:
        head = requests.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return  # the caller closed the pipe or died
        request = json.loads(requests.read(_LENGTH.unpack(head)[0]))
        header, blobs = _answer(getattr(module, request["function"]), request["args"], budget)
        # A worker whose address space stayed large (a fragmented heap after a big file) retires after
        # this answer, so that what one file needed cannot make the next one fail against the cap.
        retire = _mapped_bytes() - baseline > (limit - baseline) // 4
        header.update(blobs=len(blobs), retire=retire, **_usage())
        _write_message(answers, json.dumps(header).encode())
        for blob in blobs:
            _write_message(answers, blob)
        if retire:
            return


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
