"""The asyncio worker: claims due messages from the inbox and processes them.

Safe with any number of workers in any number of processes: rows are claimed
in one transaction (FOR UPDATE SKIP LOCKED on PostgreSQL, an IMMEDIATE
transaction on SQLite) and get a claim token and a lease. A row whose lease
expired (its worker died) is claimed again. Only the oldest open message of a
chat is ever claimable, so a chat's messages are handled one at a time, in order.
"""

import asyncio
import logging
import os
import socket
import time
import traceback
from collections import defaultdict
from datetime import datetime, timedelta
from uuid import uuid4

import httpx
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from webhooks import notify
from webhooks.db import run_db
from webhooks.http import new_http_client
from webhooks.models import InboundMessage, Status, WorkerHeartbeat
from webhooks.processing import process_message

logger = logging.getLogger(__name__)

# The wake-up events of the workers running in this process (with their
# loops), so that a webhook stored here starts at once instead of at the
# next poll, and the worker of each loop, which can take a message the webhook
# view has just stored. They hold no tenant data.
_wake_events: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
_workers: dict[asyncio.AbstractEventLoop, "Worker"] = {}

MAX_CLAIMS = 100
HEARTBEAT_INTERVAL = 5.0


def wake_up() -> None:
    for loop, event in list(_wake_events):
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)


def new_claim_token() -> str:
    return uuid4().hex


def local_worker() -> "Worker | None":
    """The worker on this event loop, if it has a free slot (which is then reserved).

    The caller must hand the slot back with `adopt`, with the row it claimed
    for it or None.
    """
    worker = _workers.get(asyncio.get_running_loop())
    return worker if worker is not None and worker.reserve() else None


def lease_for(*, agent_timeout: int, now: datetime) -> datetime:
    seconds = agent_timeout + settings.EVOLUTION_TIMEOUT + settings.WORKER_LEASE_MARGIN
    return now + timedelta(seconds=seconds)


def claim_due_messages(*, limit: int) -> list[InboundMessage]:
    """Mark up to `limit` due messages as ours and return them, oldest first."""
    now = timezone.now()
    token = new_claim_token()
    earlier_open = InboundMessage.objects.filter(
        instance_id=OuterRef("instance_id"),
        chat_jid=OuterRef("chat_jid"),
        id__lt=OuterRef("id"),
        status__in=(Status.QUEUED, Status.PROCESSING),
    )
    due = Q(status=Status.QUEUED, next_attempt_at__lte=now) | Q(
        status=Status.PROCESSING, lease_until__lt=now
    )
    with transaction.atomic():
        rows = list(
            InboundMessage.objects.filter(due)
            .filter(~Exists(earlier_open))
            .order_by("id")
            .select_for_update(skip_locked=True, of=("self",))
            .values_list("id", "instance__agent_timeout")[:limit]
        )
        by_timeout: dict[int, list[int]] = defaultdict(list)
        for pk, agent_timeout in rows:
            by_timeout[agent_timeout].append(pk)
        for agent_timeout, pks in by_timeout.items():
            InboundMessage.objects.filter(pk__in=pks).update(
                status=Status.PROCESSING,
                claim_token=token,
                lease_until=lease_for(agent_timeout=agent_timeout, now=now),
                attempts=F("attempts") + 1,
            )
    if not rows:
        return []
    # By primary key: claim_token has no index, and a lookup on it scanned every
    # stored row (0.9 s on SQLite with a million finished messages).
    return list(
        InboundMessage.objects.filter(pk__in=[pk for pk, _ in rows])
        .select_related("instance")
        .order_by("id")
    )


def release(*, message: InboundMessage, error: str = "", delay: float = 0.0) -> None:
    """Give a claimed row back to the queue (on shutdown or after a crash in our code)."""
    fields: dict[str, object] = {
        "status": Status.QUEUED,
        "claim_token": "",
        "lease_until": None,
        "next_attempt_at": timezone.now() + timedelta(seconds=delay),
    }
    if error:
        fields["last_error"] = error
    if message.attempts >= MAX_CLAIMS:
        fields.update(status=Status.FAILED, finished_at=timezone.now(), next_attempt_at=None)
    InboundMessage.objects.filter(
        pk=message.pk, claim_token=message.claim_token, status=Status.PROCESSING
    ).update(**fields)


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
        self._in_flight: dict[asyncio.Task[None], InboundMessage] = {}
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
        _wake_events.add(entry)
        _workers[loop] = self
        logger.info("worker started concurrency=%d", self.concurrency)
        try:
            listener = asyncio.create_task(notify.listen(on_notify=self._wake.set, stop=stop))
            # Room for every message's agent call and sendText, and typing presences.
            async with new_http_client(max_connections=self.concurrency * 3) as http:
                self._http = http
                try:
                    await self._loop(stop=stop)
                finally:
                    self._stopping = True
                    listener.cancel()
                    await self._drain()
                    self._http = None
        finally:
            _wake_events.discard(entry)
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

    def adopt(self, message: InboundMessage | None) -> None:
        """Process a row claimed for this worker on insert (None: the slot is not used)."""
        self._reserved -= 1
        if message is None:
            return
        if self._stopping:
            # Too late to start: give it back now rather than at lease expiry.
            task = asyncio.create_task(run_db(release, message=message))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
            return
        self._start(message)

    def _free(self) -> int:
        # Webhook views may reserve slots while a claim is running: then the
        # worker holds a few more messages than its concurrency, for a moment.
        # Counting the claim's slots as taken instead kept views from claiming
        # on insert whenever a claim ran, which under load is nearly always
        # (end-to-end overhead p50 76 -> 153 ms in the bench).
        return self.concurrency - len(self._in_flight) - self._reserved

    def _start(self, message: InboundMessage) -> None:
        assert self._http is not None
        task = asyncio.create_task(self._process(message=message, http=self._http))
        self._in_flight[task] = message

    async def _loop(self, *, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            await self._beat()
            free = self._free()
            claimed: list[InboundMessage] = []
            if free > 0:
                try:
                    claimed = await run_db(claim_due_messages, limit=free)
                except DatabaseError:
                    # run_db has dropped the connection; the next loop reconnects.
                    logger.exception("worker could not claim messages; retrying")
            for message in claimed:
                self._start(message)
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

    async def _process(self, *, message: InboundMessage, http: httpx.AsyncClient) -> None:
        try:
            await process_message(message=message, http=http)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug or a lost database: give the row back with a delay rather
            # than leave it to the lease, and keep the error on it.
            logger.exception("message id=%s failed in the worker", message.message_id)
            error = traceback.format_exc(limit=3)[-2000:]
            try:
                await run_db(release, message=message, error=error, delay=30.0)
            except DatabaseError:
                logger.exception("could not release message id=%s", message.message_id)
        finally:
            self._in_flight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wake.set()

    async def _drain(self) -> None:
        """Let in-flight messages finish for a while, then hand the rest back."""
        if not self._in_flight:
            return
        logger.info("worker finishing %d messages in flight", len(self._in_flight))
        tasks = list(self._in_flight)
        pending = set(tasks)
        if self.shutdown_grace > 0:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        leftovers = [self._in_flight.get(task) for task in pending]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for message in leftovers:
            if message is not None:
                await run_db(release, message=message)
        if leftovers:
            logger.info("worker released %d unfinished messages", len(leftovers))


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
