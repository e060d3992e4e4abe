"""The asyncio worker: claims conversations with due work and handles their messages.

Safe with any number of workers in any number of processes: conversations
are claimed in one transaction (FOR UPDATE SKIP LOCKED on PostgreSQL, an
IMMEDIATE transaction on SQLite) and get a claim token and a lease. One lease
per chat: a chat is handled by one worker at a time, its messages in order. A
conversation whose lease expired (its worker died) is claimed again.
"""

import asyncio
import logging
import os
import socket
import time
import traceback
from datetime import datetime, timedelta
from uuid import uuid4

import httpx
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from instances.clients.http import new_http_client
from webhooks import notify
from webhooks.callbacks import run_callback_loop
from webhooks.db import run_db
from webhooks.dispatcher import Dispatcher
from webhooks.models import WorkerHeartbeat
from webhooks.processing import handle_batch
from webhooks.reply_sending import stop_after_send
from webhooks.transitions import Batch, claim_conversations, release_batch
from webhooks.wakeup import wake_events

logger = logging.getLogger(__name__)

# The worker of each event loop of this process, which can take a conversation
# the webhook view has just claimed for it. It holds no tenant data.
_workers: dict[asyncio.AbstractEventLoop, "Worker"] = {}

HEARTBEAT_INTERVAL = 5.0


def local_worker() -> "Worker | None":
    """The worker on this event loop, if it has a free slot (which is then reserved).

    The caller must hand the slot back with `adopt`, with the conversation it
    claimed for it or None.
    """
    worker = _workers.get(asyncio.get_running_loop())
    return worker if worker is not None and worker.reserve() else None


def beat(*, worker_id: str, started_at: datetime) -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        worker_id=worker_id,
        defaults={
            "hostname": socket.gethostname()[:255],
            "pid": os.getpid(),
            "started_at": started_at,
            "last_seen_at": now,
        },
    )
    # Workers that died without saying goodbye.
    WorkerHeartbeat.objects.filter(last_seen_at__lt=now - timedelta(hours=1)).delete()


def forget(*, worker_id: str) -> None:
    WorkerHeartbeat.objects.filter(worker_id=worker_id).delete()


class Worker:
    def __init__(
        self,
        *,
        concurrency: int | None = None,
        poll_interval: float | None = None,
        shutdown_grace: float | None = None,
    ) -> None:
        self.concurrency = concurrency or settings.WORKER_CONCURRENCY
        self.poll_interval = poll_interval or settings.WORKER_POLL_INTERVAL
        self.shutdown_grace = (
            settings.WORKER_SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace
        )
        self._in_flight: dict[asyncio.Task[None], Batch] = {}
        self._reserved = 0
        self._stopping = False
        self._releasing: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self.worker_id = uuid4().hex
        self.started_at = timezone.now()
        self._last_beat = 0.0

    async def run(self, *, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        entry = (loop, self._wake)
        wake_events.add(entry)
        _workers[loop] = self
        logger.info("worker started concurrency=%d", self.concurrency)
        try:
            # Room for every chat's agent call and sendText, and typing presences.
            async with new_http_client(max_connections=self.concurrency * 3) as http:
                self._http = http
                # The status callbacks: a task of their own, never in the way of a send.
                callbacks = asyncio.create_task(
                    run_callback_loop(stop=stop, http=http, poll_interval=self.poll_interval)
                )
                # The outbox's paced sends (webhooks/dispatcher.py), beside the chats.
                dispatcher = Dispatcher(http=http) if settings.OUTBOX_DISPATCHER else None
                dispatching = asyncio.create_task(dispatcher.run(stop=stop)) if dispatcher else None

                def woken() -> None:
                    self._wake.set()
                    if dispatcher is not None:
                        dispatcher.wake.set()

                listener = asyncio.create_task(notify.listen(on_notify=woken, stop=stop))
                try:
                    await self._loop(stop=stop)
                finally:
                    self._stopping = True
                    listener.cancel()
                    await self._drain()
                    callbacks.cancel()
                    await asyncio.gather(callbacks, return_exceptions=True)
                    if dispatching is not None:
                        await asyncio.gather(dispatching, return_exceptions=True)
                    self._http = None
        finally:
            wake_events.discard(entry)
            _workers.pop(loop, None)
            try:
                await run_db(forget, worker_id=self.worker_id)
            except DatabaseError:
                logger.warning("could not remove the worker's heartbeat")
            logger.info("worker stopped")

    def reserve(self) -> bool:
        if self._stopping or self._http is None or self._free() <= 0:
            return False
        self._reserved += 1
        return True

    def adopt(self, batch: Batch | None) -> None:
        """Handle a chat claimed for this worker on insert (None: the slot is not used)."""
        self._reserved -= 1
        if batch is None:
            return
        if self._stopping:
            # Too late to start: give it back now rather than at lease expiry.
            task = asyncio.create_task(run_db(release_batch, batch=batch))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
            return
        self._start(batch)

    def _free(self) -> int:
        # Webhook views may reserve slots while a claim is running: then the
        # worker holds a few more messages than its concurrency, for a moment.
        # Counting the claim's slots as taken instead kept views from claiming
        # on insert whenever a claim ran, which under load is nearly always
        # (end-to-end overhead p50 76 -> 153 ms in the bench).
        return self.concurrency - len(self._in_flight) - self._reserved

    def _start(self, batch: Batch) -> None:
        assert self._http is not None
        task = asyncio.create_task(self._process(batch=batch, http=self._http))
        self._in_flight[task] = batch

    async def _loop(self, *, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            await self._beat()
            free = self._free()
            claimed: list[Batch] = []
            if free > 0:
                try:
                    claimed = await run_db(claim_conversations, limit=free)
                except DatabaseError:
                    # run_db has dropped the connection; the next loop reconnects.
                    logger.exception("worker could not claim conversations; retrying")
            for batch in claimed:
                self._start(batch)
            # Never loop without waiting: this loop shares the event loop with
            # the webhook views whose slots it counts.
            if free <= 0 or len(claimed) < free:
                await _wait_any(self._wake, stop, timeout=self.poll_interval)

    async def _beat(self) -> None:
        if time.monotonic() - self._last_beat < HEARTBEAT_INTERVAL:
            return
        self._last_beat = time.monotonic()
        try:
            await run_db(beat, worker_id=self.worker_id, started_at=self.started_at)
        except DatabaseError:
            logger.warning("worker heartbeat failed")

    async def _process(self, *, batch: Batch, http: httpx.AsyncClient) -> None:
        try:
            await handle_batch(batch=batch, http=http)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a lost database: give the rows back with a delay rather
            # than leave them to the lease, and keep the error on them.
            logger.exception("conversation id=%s failed in the worker", batch.conversation.pk)
            error = traceback.format_exc(limit=3)[-2000:]
            try:
                await run_db(release_batch, batch=batch, error=error, delay=30.0)
            except DatabaseError:
                logger.exception("could not release conversation id=%s", batch.conversation.pk)
        finally:
            self._in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wake.set()

    async def _drain(self) -> None:
        """Let in-flight messages finish for a while, then hand the rest back."""
        if not self._in_flight:
            return
        logger.info("worker finishing %d conversations in flight", len(self._in_flight))
        tasks = list(self._in_flight)
        pending = set(tasks)
        if self.shutdown_grace > 0:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        leftovers = [self._in_flight.get(task) for task in pending]
        sending = [task for task in pending if not stop_after_send(task)]
        if sending:
            # A task in a sendText finishes it and records its outcome before it
            # stops: wait for that (bounded by the send's own timeout) before
            # handing the rows back.
            logger.info("worker waiting for %d sends in flight", len(sending))
            _, stuck = await asyncio.wait(sending, timeout=settings.EVOLUTION_TIMEOUT + 5.0)
            for task in stuck:
                task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for batch in leftovers:
            if batch is not None:
                await run_db(release_batch, batch=batch)
        if leftovers:
            logger.info("worker released %d unfinished conversations", len(leftovers))


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
