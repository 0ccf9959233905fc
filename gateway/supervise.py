"""``gateway serve --processes N``: N gateway processes behind one port, kept alive.

One CPython process runs its Python on one core at a time (the GIL), and translating and sealing a
letter is CPU work: a second process is what lets the gateway use a second core.  The supervisor
reserves the port, forks the workers (each listens on it: the kernel spreads connections among
them, see :class:`Listener`), and:

- restarts a worker that dies (after a back-off that grows while workers keep dying), so a crash
  costs a few seconds of one process, never the service; what the dead worker had claimed is retaken
  when its lease expires, as for any crash (nothing lost, nothing sent twice: see the outbox);
- on SIGTERM or SIGINT, passes SIGTERM on and waits for the workers to finish (then SIGKILL);
- if the supervisor itself is killed, the kernel kills its workers (``PR_SET_PDEATHSIG``), so no
  orphan keeps serving the port.

Workers are forked before any thread or database connection exists in the supervisor: each builds
its own engine, delivery threads and event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from gateway.logs import get_logger

__all__ = ["Listener", "settle_heap", "supervise"]

_log = get_logger("gateway.supervise")
_PR_SET_PDEATHSIG = 1
_GRACE = 30.0  # seconds a worker gets to finish on shutdown


class Listener:
    """The port the workers serve: reserved by the supervisor, a listening socket per worker.

    Where the kernel has ``SO_REUSEPORT`` (Linux), each worker listens on a socket of its own and the
    kernel spreads new connections evenly among them.  With one shared socket, the worker that woke
    first accepted every pending connection at once (libuv accepts until none is left): measured in
    ``bench/bench_load.py``, one worker got 731 letters and the other 39, so one core sat idle while a
    hospital's keep-alive connections queued on the other.  The supervisor binds the port without
    listening (a port in use fails at start-up, and nothing is ever queued on a socket nobody
    accepts); a worker that dies takes its own socket with it and new connections go to the others.
    Elsewhere, the workers share one listening socket."""

    def __init__(self, host: str, port: int) -> None:
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.each = hasattr(socket, "SO_REUSEPORT")
        self.sock = self._socket(host, port)
        self.address = self.sock.getsockname()[:2]  # the port chosen, when 0 was asked for
        if not self.each:
            self.sock.listen(2048)

    def _socket(self, host: str, port: int) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.each:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def for_worker(self) -> socket.socket:
        """The socket this worker accepts on (called in the worker, after the fork)."""
        if not self.each:
            return self.sock
        sock = self._socket(*self.address)
        sock.listen(2048)
        return sock


def settle_heap(every: float = 300.0, allocations: int = 500_000) -> threading.Thread:
    """Before serving: keep the cycle collector out of the requests' way.

    What start-up built (modules, mappings, the app) is moved out of the collector's sight
    (``gc.freeze``), and automatic collection is switched off: a letter allocates tens of thousands
    of short-lived containers, so the collector ran every few letters and stopped every thread of
    the process for up to 170 ms at a time (measured in ``bench/bench_load.py``: the p99 latency).
    The letter path makes no reference cycles (``tests/unit/test_heap.py``), so reference counting
    frees its garbage at once; what cycles remain (a framework's, an exception's traceback) are
    collected by a daemon thread every ``every`` seconds, and the young generations as soon as
    ``allocations`` containers have piled up since the last collection."""
    gc.collect()
    gc.freeze()
    gc.disable()
    thread = threading.Thread(target=_collect, args=(every, allocations), name="gc-collector", daemon=True)
    thread.start()
    return thread


def _collect(every: float, allocations: int) -> None:
    """Young generations when allocations pile up, the whole heap only every ``every`` seconds: a full
    collection walks every live container — the translations a worker keeps for its waiting letters,
    millions of them — while holding the GIL (2.7% of the gateway's CPU under load, measured with py-spy,
    when every pile-up ran one)."""
    last = time.monotonic()
    while True:
        time.sleep(min(1.0, every))
        if time.monotonic() - last >= every:
            gc.collect()
            last = time.monotonic()
        elif gc.get_count()[0] >= allocations:
            gc.collect(1)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the supervisor dies (elsewhere: best effort, nothing) — and
    leave at once if it died between the fork and this call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _fork(index: int, run: Callable[[int], int]) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: run, then leave without running the supervisor's exit handlers
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent(parent)
            code = run(index)
        except BaseException:  # a worker's failure is logged, then its exit code says it
            _log.exception("gateway worker failed", worker=index)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _log.info("gateway worker started", worker=index, pid=pid)
    return pid


def supervise(count: int, run: Callable[[int], int]) -> int:
    """Run ``run(index)`` in ``count`` forked workers until SIGTERM/SIGINT; restart any that dies.

    Worker 0 is the one that also runs the process-wide duties (MLLP listener, housekeeping)."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = {_fork(i, run): i for i in range(count)}
    backoff, last_death = 0.5, 0.0
    while workers and not stopping:
        pid, status = os.waitpid(-1, os.WNOHANG)  # polled: a blocking wait would not see the signal
        if pid == 0:
            time.sleep(0.2)
            continue
        index = workers.pop(pid, None)
        if index is None:
            continue
        _log.warning(
            "gateway worker died: restarting it", worker=index, pid=pid, exit_status=os.waitstatus_to_exitcode(status)
        )
        now = time.monotonic()
        backoff = min(backoff * 2, 30.0) if now - last_death < 60 else 0.5  # a crash loop slows down
        last_death = now
        restart_at = now + backoff
        while not stopping and time.monotonic() < restart_at:
            time.sleep(0.1)
        if not stopping:
            workers[_fork(index, run)] = index
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE
    while workers and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.1)
        else:
            workers.pop(pid, None)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return 0
