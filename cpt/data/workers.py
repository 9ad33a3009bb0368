"""Batches mapped in worker processes, in order, with a Ctrl-C that stops them promptly.

A KeyboardInterrupt raised in the parent at an arbitrary bytecode can leave one of multiprocessing.Pool's
internal locks held (inside an ApplyResult's wait), and the pool's terminate then waits on it forever:
`cpt prepare --num-proc 2` hung after Ctrl-C in about 1 test run of 4. So SIGINT only sets a flag in the
parent while :func:`map_ordered` runs, and the KeyboardInterrupt is raised where no lock is held (between
results); the workers start with SIGINT blocked (the mask survives spawn's exec) so that the terminal's
Ctrl-C, which reaches the whole process group, stops them only through the parent's terminate. The
initializer should ignore SIGINT for good (``signal.signal(SIGINT, SIG_IGN)``).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import resource_tracker


def map_ordered(func: Callable, items: Iterable, num_proc: int, initializer: Callable,
                initargs: tuple) -> Iterator:
    """``func(item)`` for each item, in order, in ``num_proc`` spawned workers; reading ``items`` runs
    ahead of the workers by a few items only."""
    with _sigint_deferred() as stop, _pool(num_proc, initializer, initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) > 2 * num_proc:
                yield _result(pending.popleft(), stop)
        while pending:
            yield _result(pending.popleft(), stop)


@contextlib.contextmanager
def _sigint_deferred():
    """A flag that SIGINT sets while the block runs, where Python would raise KeyboardInterrupt."""
    stop = threading.Event()
    default = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if default:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        if default:
            signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _pool(num_proc: int, initializer: Callable, initargs: tuple):
    # spawn, not fork: the parent may hold threads (the tokenizer's, torch's) that fork would break
    ctx = multiprocessing.get_context("spawn")
    # the first spawn starts multiprocessing's resource tracker, which unblocks SIGINT when it is up: start it
    # before blocking (what CPython does for the tracker itself, bpo-33613)
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the pool's threads and workers
    try:
        pool = ctx.Pool(num_proc, initializer, initargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pool:  # exit: terminate
        yield pool


def _result(pending, stop: threading.Event):
    while True:
        if stop.is_set():
            raise KeyboardInterrupt
        try:
            return pending.get(timeout=0.05)
        except multiprocessing.TimeoutError:
            pass
