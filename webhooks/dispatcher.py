"""The outbox's dispatcher: drains each instance's queued API and operator sends,
paced, one instance per task, in the worker process (webhooks/worker.py).

Every state change is webhooks/outbox.py's; this module only decides when to
call Evolution (instances/clients/evolution.py, the one place that sends).
Exactly once, as far as Evolution can tell: a row is committed `sending`
before the call and `sent` with key.id after it; a row found `sending` or
`unconfirmed` when an outbox is taken (a dispatcher died mid-send, or no
answer came back) is looked up with findMessages (webhooks/duplicates.py)
before it or anything after it goes.
"""

import asyncio
import logging
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from instances.clients.evolution import (
    EvolutionClient,
    instance_target,
    sent_key_id,
)
from instances.clients.http import OutboundError
from omnihub.logging import kv
from webhooks import metrics, outbox
from webhooks.db import run_db
from webhooks.duplicates import Verdict, check_earlier_send
from webhooks.models import OutboundMessage
from webhooks.rows import EarlierAttempt, recorded_ids
from webhooks.wakeup import wake_events

logger = logging.getLogger("webhooks.outbox")

# An instance is let go after this many sends, so that instances waiting for a
# slot get their turn (it is due again at once, behind those due before it).
SENDS_PER_HOLD = 50
# Outboxes taken per claim: a few at a time, so that every worker process (and
# core) gets its share of the instances rather than the first one all of them.
CLAIM_BATCH = 4
# Evolution could not be asked whether a send went out: the instance waits this long.
CHECK_RETRY_SECONDS = 30.0
# A post this much after its paced time moves the instance's pacing clock to it
# (a statement more, so not for the usual millisecond of the loop's timer).
POSTED_LATE = timedelta(milliseconds=2)


async def post(evolution: EvolutionClient, row: OutboundMessage) -> dict:
    """The row's message out through Evolution; raises OutboundError."""
    if row.media:
        media = row.media
        return await evolution.send_media(
            number=row.chat_jid,
            mediatype=media.get("mediatype", "document"),
            media=media.get("url") or media.get("base64") or "",
            mimetype=media.get("mime_type", ""),
            file_name=media.get("file_name", ""),
            caption=media.get("caption", ""),
        )
    return await evolution.send_text(number=row.chat_jid, text=row.text)


class Dispatcher:
    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        concurrency: int | None = None,
        poll_interval: float | None = None,
    ) -> None:
        self.http = http
        self.concurrency = concurrency or settings.OUTBOX_CONCURRENCY
        self.poll_interval = poll_interval or settings.WORKER_POLL_INTERVAL
        self.wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sends: set[asyncio.Future[None]] = set()
        self._stop = asyncio.Event()

    async def run(self, *, stop: asyncio.Event) -> None:
        self._stop = stop
        entry = (asyncio.get_running_loop(), self.wake)
        wake_events.add(entry)
        try:
            while not stop.is_set():
                self.wake.clear()
                free = self.concurrency - len(self._tasks)
                held: list[outbox.Held] = []
                if free > 0:
                    try:
                        held = await run_db(outbox.claim_outboxes, limit=min(free, CLAIM_BATCH))
                    except DatabaseError:
                        logger.exception("dispatcher could not claim outboxes; retrying")
                for one in held:
                    task = asyncio.create_task(self._drain(one))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
                if free <= 0 or len(held) < min(free, CLAIM_BATCH):
                    await _wait_any(self.wake, stop, timeout=self.poll_interval)
        finally:
            wake_events.discard(entry)
            # Each task finishes the send it started (shielded) and lets its outbox go.
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=settings.EVOLUTION_TIMEOUT + 5.0)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake.set()

    async def _drain(self, held: outbox.Held) -> None:
        instance = held.instance
        released = False
        try:
            sends = 0
            # A row is in doubt (`sending` or `unconfirmed`) only when an earlier
            # holder left it so, seen at the first step, or when one of this hold's
            # sends got no clear answer: it is looked for then only.
            check_doubt = True
            while not self._stop.is_set():
                step = await run_db(
                    outbox.next_step,
                    instance_id=instance.pk,
                    token=held.token,
                    instance=instance,
                    check_doubt=check_doubt,
                )
                if step.action in (outbox.Action.LOST, outbox.Action.RELEASED):
                    released = True
                    if step.reason in ("interval", "daily_limit"):
                        metrics.outbox_paced_waits.labels(instance.name, step.reason).inc()
                    return
                assert step.row is not None
                if step.action is outbox.Action.CHECK:
                    if not await self._check(held, step.row, probe_id=step.probe_id):
                        released = True
                        return
                    continue
                check_doubt = False
                if step.action is outbox.Action.WAIT:
                    metrics.outbox_paced_waits.labels(instance.name, "interval").inc()
                    assert step.until is not None
                    delay = _until(step.until - outbox.SEND_LEAD)
                    await _wait_any(self._stop, timeout=delay)
                    continue
                # SEND: the row is committed `sending`, to be posted at step.at. A
                # send that has started finishes, and is recorded, even when the
                # worker is stopped.
                send = asyncio.ensure_future(self._send(held, step))
                self._sends.add(send)
                send.add_done_callback(self._sends.discard)
                posted, outcome = await asyncio.shield(send)
                check_doubt = outcome is not outbox.Outcome.SENT
                sends += 1
                if sends >= SENDS_PER_HOLD:
                    break
                # The paced wait before asking for the next one (a step fewer per
                # send), which is taken up to SEND_LEAD before its time; counted
                # from the post itself, which may have gone out late.
                assert step.until is not None and step.at is not None
                delay = _until(posted + (step.until - step.at) - outbox.SEND_LEAD)
                if 0 < delay <= outbox.MAX_HELD_WAIT:
                    metrics.outbox_paced_waits.labels(instance.name, "interval").inc()
                    await _wait_any(self._stop, timeout=delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("outbox of instance %s failed in the dispatcher", instance.name)
        finally:
            if not released:
                try:
                    await run_db(outbox.release, instance_id=instance.pk, token=held.token)
                except DatabaseError:
                    logger.exception("could not release the outbox of %s", instance.name)

    async def _send(
        self, held: outbox.Held, step: outbox.Next
    ) -> tuple[datetime, outbox.Outcome]:
        """Post the step's row at its time and record the outcome; when it was
        posted, and the outcome recorded."""
        instance, row, at = held.instance, step.row, step.at
        assert row is not None
        evolution = EvolutionClient(target=instance_target(instance), http=self.http)
        outcome, evolution_id, error = outbox.Outcome.SENT, "", ""
        if at is not None:
            # Its paced time (at most SEND_LEAD away): not cut short by a stop.
            await asyncio.sleep(_until(at))
        posted = timezone.now()
        late = at is not None and posted - at > POSTED_LATE
        try:
            if not instance.evolution_url or not instance.evolution_key:
                raise OutboundError("No Evolution URL/key to send with.", retryable=False)
            answer = await post(evolution, row)
            evolution_id = sent_key_id(answer)
        except OutboundError as exc:
            metrics.outbound_errors.labels(instance.name, "evolution", exc.status or "none").inc()
            error = str(exc)
            if outbox.is_rate_limit(error):
                outcome = outbox.Outcome.RATE_LIMITED
            elif exc.maybe_sent:
                outcome = outbox.Outcome.UNCONFIRMED
            elif exc.retryable or exc.status == 429:
                outcome = outbox.Outcome.RETRY
            else:
                outcome = outbox.Outcome.FAILED
        finished = await run_db(
            outbox.finish_send,
            row_id=row.pk,
            attempt=row.attempts,
            instance_id=instance.pk,
            token=held.token,
            outcome=outcome,
            evolution_id=evolution_id,
            error=error,
            posted_late_at=posted if late else None,
            failing=step.failing,
        )
        metrics.outbox_sends.labels(instance.name, row.kind, finished.outcome.value).inc()
        if finished.paused_until is not None:
            metrics.outbox_pauses.labels(instance.name).inc()
            logger.warning(
                "outbox paused %s",
                kv(instance=instance.name, until=finished.paused_until.isoformat(), error=error),
            )
        logger.info(
            "outbound %s",
            kv(
                instance=instance.name,
                id=row.pk,
                kind=row.kind,
                status=finished.outcome.value,
                evolution_id=evolution_id,
                error=error,
            ),
        )
        return posted, finished.outcome

    async def _check(
        self, held: outbox.Held, row: OutboundMessage, *, probe_id: str | None
    ) -> bool:
        """Ask Evolution whether a row in doubt went out; False when it could not
        be asked (the instance waits and asks again)."""
        instance = held.instance
        # The question can take a few calls: the lease covers them.
        await run_db(outbox.renew, instance_id=instance.pk, token=held.token)
        evolution = EvolutionClient(target=instance_target(instance), http=self.http)
        started = row.attempt_started_at or row.created_at
        attempt = EarlierAttempt(
            outbound_id=row.pk, started_at=started, evolution_id=row.evolution_id, status=row.status
        )

        async def recorded(ids: list[str]) -> set[str]:
            return await run_db(
                recorded_ids, instance_id=instance.pk, evolution_ids=ids, excluding=row.pk
            )

        text = row.text if not row.media else row.media.get("caption", "")
        try:
            check = await check_earlier_send(
                evolution,
                attempt=attempt,
                chat_jid=row.chat_jid,
                text=text,
                answered_id=probe_id,
                now=timezone.now(),
                recorded_ids=recorded,
            )
        except OutboundError as exc:
            metrics.outbound_errors.labels(instance.name, "evolution", exc.status or "none").inc()
            if exc.retryable:
                until = timezone.now() + timedelta(seconds=CHECK_RETRY_SECONDS)
                await run_db(
                    outbox.release, instance_id=instance.pk, token=held.token, due_at=until
                )
                return False
            await run_db(
                outbox.settle_in_doubt,
                row_id=row.pk,
                note=f"could not ask Evolution ({exc}): sent again, may be a duplicate",
            )
            metrics.resend_checks.labels(instance.name, "unknown").inc()
            return True
        metrics.resend_checks.labels(instance.name, check.verdict.value).inc()
        if check.verdict is Verdict.SENT:
            await run_db(outbox.settle_in_doubt, row_id=row.pk, sent_id=check.evolution_id)
        else:
            note = check.note or "not among Evolution's messages: sent again"
            await run_db(outbox.settle_in_doubt, row_id=row.pk, note=note)
        logger.info(
            "outbound %s",
            kv(instance=instance.name, id=row.pk, checked=check.verdict.value),
        )
        return True


def _until(moment: datetime) -> float:
    """Seconds from now to `moment`, 0 when it has passed."""
    return max(0.0, (moment - timezone.now()).total_seconds())


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
