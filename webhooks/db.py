"""Running ORM code from async code: one database thread per process, group commit.

Django's ASGI handler runs each request's sync code in a thread of its own and
closes the database connection when the request ends: on the webhook path that
is a new connection, its PRAGMAs and a close for every delivery, and a commit
per row. With two processes on SQLite every commit also competes for the one
write lock, and a waiting writer sleeps in steps of several milliseconds.

Here every database call of the webhook view and the worker goes to one
thread per process that keeps its connection for the life of the process.
Calls that arrive while it is busy are run together in one transaction: one
lock and one commit for many deliveries (should one call fail, the batch runs
again with each call in a savepoint, so that only that one fails). A caller's
result (or exception) is handed back only after that commit, so a webhook is
still answered 200 only once its row is durable.
"""

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, OperationalError, connection, transaction

T = TypeVar("T")
logger = logging.getLogger(__name__)

MAX_BATCH = 200
# How long the event loop's thread may keep the GIL when the database thread
# wants it back (CPython's default is 5 ms). Each statement releases the GIL;
# with the default, a busy loop kept the database thread waiting for it while
# that thread held SQLite's write lock, so the other process's writers waited
# too: in bench/ingest_profile.py the database thread's time per answered
# message fell from 0.78-0.88 to 0.54-0.70 ms with 0.5 ms, for the same CPU.
SWITCH_INTERVAL = 0.0005
Call = tuple[Callable[..., Any], dict[str, Any], "asyncio.Future[Any]"]


class GroupCommitter:
    """Runs queued calls on its thread, many per transaction.

    A call made while the thread is idle goes to it at once, from the caller's
    task, and its outcome is handed straight to the caller's future: no task of
    the committer's own sits between them. That is two event-loop turns fewer
    per call (about 0.1 ms on an idle hub, and on the reply's path between the
    agent's answer and its sendText). Calls made while it is busy wait and go
    together as the next batch, as soon as the current one is back.
    """

    def __init__(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self.pending: list[Call] = []
        self.busy = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omnihub-db")

    async def submit(self, fn: Callable[..., T], kwargs: dict[str, Any]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.pending.append((fn, kwargs, future))
        if not self.busy:
            self._start(loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
        self.busy = True
        calls = [(fn, kwargs) for fn, kwargs, _ in batch]
        try:
            running = self.executor.submit(_execute, calls)
        except RuntimeError as exc:
            # The executor was shut down (close_database_threads): nothing runs.
            self.busy = False
            _hand_back(batch, [(False, exc)] * len(batch))
            return

        def back(ran: "Future[list[tuple[bool, Any]]]") -> None:
            # On the database thread: the rest happens on the loop.
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._done, loop, batch, ran)

        running.add_done_callback(back)

    def _done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[Call],
        ran: "Future[list[tuple[bool, Any]]]",
    ) -> None:
        self.busy = False
        try:
            outcomes = ran.result()
        except Exception as exc:
            outcomes = [(False, exc)] * len(batch)
        _hand_back(batch, outcomes)
        if self.pending:
            self._start(loop)


def _hand_back(batch: list[Call], outcomes: list[tuple[bool, Any]]) -> None:
    for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            # Its caller was cancelled; the call ran all the same.
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _SQLiteWriterLock:
    """One writer at a time across processes, waiting in the kernel.

    SQLite allows one writer; a second one that finds the lock taken polls,
    sleeping up to 100 ms between looks. Under load from two processes those
    sleeps, not the work, set the pace (tens of deliveries a second instead
    of thousands). A blocking flock on a file beside the database wakes the
    next writer the moment the previous one commits.
    """

    def __init__(self) -> None:
        self.fd: int | None = None

    def __enter__(self) -> None:
        if connection.vendor != "sqlite":
            return
        name = str(connection.settings_dict["NAME"])
        if self.fd is None and name and ":memory:" not in name and "mode=memory" not in name:
            self.fd = os.open(f"{name}.omnihub-lock", os.O_RDWR | os.O_CREAT, 0o600)
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


_writer_lock = _SQLiteWriterLock()


@dataclass(frozen=True)
class Then:
    """What a call's first step (see `first_step`) leaves to run in the transaction."""

    fn: Callable[..., Any]
    kwargs: dict[str, Any]


_FIRST_STEPS: dict[Callable[..., Any], Callable[..., Any]] = {}


def first_step(step: Callable[..., Any]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """On the database thread, run `step` (same arguments) before the batch's lock.

    It may only read: it returns the call's result, or a `Then` with what is
    left to do in the transaction. Under load the work before the lock (for a
    delivery: the tenant's lookup, the token, parsing the body) runs while
    another process holds it, instead of adding to every writer's wait.
    Called directly, the function does the whole (its own body must say so).
    """

    def mark(fn: Callable[..., T]) -> Callable[..., T]:
        _FIRST_STEPS[fn] = step
        return fn

    return mark


Calls = list[tuple[Callable[..., Any], dict[str, Any]]]


def _execute(calls: Calls) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any] | None] = [None] * len(calls)
    locked: list[tuple[int, Callable[..., Any], dict[str, Any]]] = []
    for index, (fn, kwargs) in enumerate(calls):
        step = _FIRST_STEPS.get(fn)
        if step is None:
            locked.append((index, fn, kwargs))
            continue
        try:
            value = step(**kwargs)
        except DatabaseError as exc:
            logger.warning("database read failed: %s", exc)
            connection.close()
            outcomes[index] = (False, exc)
            continue
        except Exception as exc:
            outcomes[index] = (False, exc)
            continue
        if isinstance(value, Then):
            locked.append((index, value.fn, value.kwargs))
        else:
            outcomes[index] = (True, value)
    if locked:
        done = _execute_locked([(fn, kwargs) for _, fn, kwargs in locked])
        for (index, _, _), outcome in zip(locked, done, strict=True):
            outcomes[index] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


def _execute_locked(calls: Calls) -> list[tuple[bool, Any]]:
    if len(calls) == 1:
        return [_execute_alone(*calls[0])]
    try:
        with _writer_lock, transaction.atomic():
            return [(True, fn(**kwargs)) for fn, kwargs in calls]
    except Exception:
        # Rare: one call failed and took the transaction with it. Run them all
        # again, each in a savepoint of its own, so that only it fails. Calls
        # change the database and nothing else (not their arguments), so
        # running one twice is safe.
        # A savepoint for every call of every batch would cost two statements
        # (on PostgreSQL two round trips) per call, and lengthen the window in
        # which a sent reply is not yet marked as sent.
        pass
    outcomes: list[tuple[bool, Any]] = []
    try:
        with _writer_lock, transaction.atomic():
            for fn, kwargs in calls:
                outcomes.append(_call_in_savepoint(fn, kwargs))
    except DatabaseError as exc:
        # The commit failed: nothing of the batch is stored. The connection
        # may be broken (database restarted): open a new one next time.
        logger.warning("database batch of %d failed: %s", len(calls), exc)
        connection.close()
        return [(False, exc)] * len(calls)
    return outcomes


def _execute_alone(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """A call with the transaction to itself (an idle hub's usual batch) needs no savepoint."""
    for attempt in (1, 2):
        try:
            with _writer_lock, transaction.atomic():
                return True, fn(**kwargs)
        except DatabaseError as exc:
            if attempt == 1 and _is_deadlock(exc):
                continue
            # As for a failed batch: the connection may be broken, use a new one.
            logger.warning("database call failed: %s", exc)
            connection.close()
            return False, exc
        except Exception as exc:
            return False, exc
    raise AssertionError("unreachable")


def _call_in_savepoint(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """A savepoint each: one call's failure leaves the others' work."""
    for attempt in (1, 2):
        try:
            with transaction.atomic():
                return True, fn(**kwargs)
        except OperationalError as exc:
            # Two servers storing copies of the same deliveries in different
            # orders can deadlock on PostgreSQL; the other side has won once
            # this statement is aborted, so one more try goes through.
            if attempt == 1 and _is_deadlock(exc):
                continue
            return False, exc
        except Exception as exc:
            return False, exc
    raise AssertionError("unreachable")


def _is_deadlock(exc: Exception) -> bool:
    return getattr(exc.__cause__, "sqlstate", None) == "40P01"


_committers: dict[asyncio.AbstractEventLoop, GroupCommitter] = {}


def close_database_threads() -> None:
    """Close each database thread's connection and stop the thread (tests, shutdown)."""
    while _committers:
        _, committer = _committers.popitem()
        committer.executor.submit(lambda: connection.close()).result()
        committer.executor.shutdown()


async def run_db(fn: Callable[..., T], /, **kwargs: Any) -> T:
    """Run `fn(**kwargs)` in a transaction on the process's database thread.

    `fn` may run twice (see `_execute`): it must change the database only, never
    its arguments or other state of the caller's.
    """
    if not settings.DB_GROUP_COMMIT:
        # Tests: run where the test's own connection and transaction live.
        return await sync_to_async(fn)(**kwargs)
    loop = asyncio.get_running_loop()
    committer = _committers.get(loop)
    if committer is None:
        committer = _committers[loop] = GroupCommitter()
    return await committer.submit(fn, kwargs)
