"""Status callbacks: each new status of an outbound message, POSTed to its instance's
callback_url, signed, retried with backoff, never in the way of a send.

- `queue_status_callback` writes the job (a StatusCallback row) in the caller's
  transaction: the outbox calls it from every status change of an outbound row.
- `run_callback_loop` is a task of the worker process (webhooks/worker.py): it takes
  due rows, at most CALLBACK_CONCURRENCY at once, and posts them.

The body is stored once and posted byte for byte on every attempt; the signature is
`X-Omnihub-Signature: sha256=<hex HMAC-SHA256 of the raw body, key callback_secret>`.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from instances.clients.http import OutboundError, scrub_secrets
from instances.models import InstanceConfig
from webhooks.db import run_db
from webhooks.models import CallbackState, OutboundMessage, StatusCallback
from webhooks.step import backoff

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Omnihub-Signature"
EVENT = "message.status"
# An attempt holds its row this long past its timeout (a worker that died mid-post
# leaves it due again by itself).
LEASE_MARGIN = 30.0
MAX_ERROR = 500


def sign(body: bytes, secret: str) -> str:
    """The header's value for this body: sha256=<hex HMAC-SHA256>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def queue_status_callback(*, outbound_id: int, status: str, at: datetime) -> int | None:
    """Queue the callback of an outbound message's new status; the row's id, or None
    when its instance has no callback_url. Call it in the transaction that changes
    the status: the callback exists if and only if the change does."""
    # Most instances have no callback: asked first, without building the rows
    # (this runs for every send the outbox makes).
    wanted = OutboundMessage.objects.filter(pk=outbound_id).values_list(
        "instance__callback_url", flat=True
    )
    if not wanted.first():
        return None
    # The whole instance: InstanceConfig must not be loaded with deferred fields.
    outbound = OutboundMessage.objects.select_related("instance").get(pk=outbound_id)
    instance = outbound.instance
    body = {
        "event": EVENT,
        "instance": instance.name,
        "id": outbound.pk,
        "status": status,
        "at": at.isoformat(),
        "chat_jid": outbound.chat_jid,
        "evolution_id": outbound.evolution_id,
    }
    row = StatusCallback.objects.create(
        instance_id=outbound.instance_id,
        outbound_id=outbound.pk,
        status=status,
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        next_attempt_at=timezone.now(),
    )
    return row.pk


@dataclass(frozen=True)
class Due:
    """A callback taken for one attempt."""

    pk: int
    attempts: int
    body: str
    url: str
    secret: str


def take_due(*, limit: int, now: datetime | None = None) -> list[Due]:
    """Lease up to `limit` due callbacks (conditional on their due time: another
    worker that took one first wins it)."""
    now = now or timezone.now()
    lease = now + timedelta(seconds=settings.CALLBACK_TIMEOUT + LEASE_MARGIN)
    candidates = list(
        StatusCallback.objects.filter(state=CallbackState.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", "next_attempt_at", "instance_id")[:limit]
    )
    instances = InstanceConfig.objects.in_bulk({instance_id for *_, instance_id in candidates})
    taken = []
    for pk, due_at, instance_id in candidates:
        won = StatusCallback.objects.filter(pk=pk, next_attempt_at=due_at).update(
            next_attempt_at=lease, attempts=F("attempts") + 1
        )
        if not won:
            continue
        row = StatusCallback.objects.only("attempts", "body").get(pk=pk)
        instance = instances[instance_id]
        taken.append(
            Due(
                pk=pk,
                attempts=row.attempts,
                body=row.body,
                url=instance.callback_url,
                secret=instance.callback_secret,
            )
        )
    return taken


def record_outcome(*, due: Due, error: str, now: datetime | None = None) -> None:
    """Delivered (no error), retried later with backoff, or given up after the last attempt."""
    now = now or timezone.now()
    row = StatusCallback.objects.filter(pk=due.pk, state=CallbackState.PENDING)
    if not error:
        row.update(
            state=CallbackState.DELIVERED, delivered_at=now, next_attempt_at=None, last_error=""
        )
    elif due.attempts >= settings.CALLBACK_MAX_ATTEMPTS:
        row.update(state=CallbackState.FAILED, next_attempt_at=None, last_error=error)
        logger.warning("status callback id=%s given up: %s", due.pk, error)
    else:
        row.update(next_attempt_at=now + backoff(due.attempts), last_error=error)


async def post_callback(*, due: Due, http: httpx.AsyncClient) -> str:
    """POST one callback; '' when the receiver took it (2xx), else why not."""
    if not due.url:
        return "the instance has no callback_url any more"
    body = due.body.encode()
    headers = {"content-type": "application/json"}
    if due.secret:
        headers[SIGNATURE_HEADER] = sign(body, due.secret)
    try:
        response = await http.post(
            due.url, content=body, headers=headers, timeout=settings.CALLBACK_TIMEOUT
        )
    except (httpx.HTTPError, OutboundError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return scrub_secrets(error, [due.secret])[:MAX_ERROR]
    if 200 <= response.status_code < 300:
        return ""
    return f"the receiver answered {response.status_code}"


async def deliver(*, due: Due, http: httpx.AsyncClient) -> None:
    error = await post_callback(due=due, http=http)
    await run_db(record_outcome, due=due, error=error)


async def deliver_due(*, http: httpx.AsyncClient, limit: int | None = None) -> int:
    """One round: take the due callbacks and post them at once; how many were taken."""
    taken = await run_db(take_due, limit=limit or settings.CALLBACK_CONCURRENCY)
    if taken:
        await asyncio.gather(*(deliver(due=due, http=http) for due in taken))
    return len(taken)


async def run_callback_loop(
    *, stop: asyncio.Event, http: httpx.AsyncClient, poll_interval: float
) -> None:
    """The worker's callback task: rounds of at most CALLBACK_CONCURRENCY posts; it
    waits a poll interval when a round found less than a full one."""
    while not stop.is_set():
        try:
            taken = await deliver_due(http=http)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The sends never wait for this loop; it only tries again later.
            logger.exception("status callbacks round failed; retrying")
            taken = 0
        if taken < settings.CALLBACK_CONCURRENCY:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=poll_interval)
