"""The outbox: every change of state of a queued send, and of an instance's pacing.

API and operator sends are OutboundMessage rows written `queued`; the
dispatcher (webhooks/dispatcher.py) holds one instance's outbox at a time
(OutboxState: a claim token and a lease, like a conversation's) and takes its
rows one by one: `queued` -> `sending` (committed before the Evolution call)
-> `sent` with key.id, `failed` with Evolution's error, `queued` again after a
429/5xx, or `unconfirmed` when no answer came back. Evolution's
messages.update moves a sent row (of any kind, replies too) to `delivered`
and `read`. Nothing else writes these rows' state; replies are recorded by
the chat's worker (webhooks/transitions.py, rows.py) and only read here for
pacing. Synchronous, run on the database thread by the async callers.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import Enum
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from instances.models import MAX_SEND_BACKOFF_MINUTES, InstanceConfig
from webhooks import notify
from webhooks.callbacks import queue_status_callback
from webhooks.models import (
    ConnectionState,
    OutboundKind,
    OutboundMessage,
    OutboundStatus,
    OutboxState,
)
from webhooks.transitions import NOT_CONNECTED
from webhooks.wakeup import wake_up

# A dispatcher sleeps at most this long holding an instance (a paced wait);
# a longer wait releases it, due again when the wait ends.
MAX_HELD_WAIT = 5.0
# A paced send is taken (committed `sending`) up to this long before its time,
# then posted at that time: the database's answer, which waits its turn behind
# every other instance's work under load, no longer adds to each gap (it made
# a 240 ms pace 310 ms). A dispatcher that dies in between leaves a row in
# doubt, looked up before it goes again like any other.
SEND_LEAD = timedelta(milliseconds=100)
# 429/5xx answers in a row that count as WhatsApp's rate limit.
FAILURES_BEFORE_PAUSE = 3
# The jitter: each wait is send_interval_ms times a random factor in this range
# (±20 % around 1.2: never less than send_interval_ms).
JITTER = (1.0, 1.4)
RATE_LIMIT_MARKER = "rate-overlimit"
# While the number is not connected, the outbox looks again this often (an
# "open" connection.update makes it due at once).
NOT_CONNECTED_RECHECK = 60.0
IN_DOUBT = (OutboundStatus.SENDING, OutboundStatus.UNCONFIRMED)
ORDER = ("next_attempt_at", "id")


def lease_seconds() -> float:
    return settings.EVOLUTION_TIMEOUT + settings.WORKER_LEASE_MARGIN + MAX_HELD_WAIT


# --- queueing (the send API, the console) --------------------------------------------
def request_hash(body: dict[str, Any]) -> str:
    """What a used idempotency key is compared with: the normalized request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Queued:
    message: OutboundMessage
    created: bool


def queue_send(
    *,
    instance: InstanceConfig,
    chat_jid: str,
    text: str,
    media: dict[str, Any] | None = None,
    send_at: datetime | None = None,
    idempotency_key: str = "",
    body_hash: str = "",
    kind: str = OutboundKind.API,
    sent_by_id: int | None = None,
) -> Queued:
    """Queue a send; with an idempotency key already used by this instance, the
    row it made (created False: the caller compares request_hash)."""
    now = timezone.now()
    due = max(send_at, now) if send_at else now
    try:
        with transaction.atomic():
            row = OutboundMessage.objects.create(
                instance=instance,
                kind=kind,
                sent_by_id=sent_by_id,
                chat_jid=chat_jid,
                text=text,
                media=media,
                status=OutboundStatus.QUEUED,
                idempotency_key=idempotency_key,
                request_hash=body_hash,
                send_at=send_at,
                next_attempt_at=due,
            )
            _make_due(instance_id=instance.pk, at=due)
            notify.notify_new_message()
    except IntegrityError:
        if not idempotency_key:
            raise
        existing = OutboundMessage.objects.get(instance=instance, idempotency_key=idempotency_key)
        return Queued(existing, created=False)
    transaction.on_commit(wake_up)
    return Queued(row, created=True)


def _make_due(*, instance_id: int, at: datetime) -> None:
    """The instance's outbox has work at `at`: due then, unless due sooner or held."""
    state, _ = OutboxState.objects.get_or_create(instance_id=instance_id)
    OutboxState.objects.filter(pk=state.pk, claim_token="").filter(
        Q(due_at__isnull=True) | Q(due_at__gt=at)
    ).update(due_at=at)


# --- the dispatcher's claim ------------------------------------------------------
@dataclass
class Held:
    state: OutboxState
    token: str

    @property
    def instance(self) -> InstanceConfig:
        return self.state.instance


def claim_outboxes(*, limit: int) -> list[Held]:
    """Take up to `limit` due instance outboxes. Reads due OutboxState rows only."""
    now = timezone.now()
    if not OutboxState.objects.filter(due_at__lte=now).exists():
        return []
    with transaction.atomic():
        states = list(
            OutboxState.objects.filter(due_at__lte=now)
            .order_by("due_at")
            .select_for_update(skip_locked=True)[:limit]
        )
        if not states:
            return []
        token = new_token()
        lease = now + timedelta(seconds=lease_seconds())
        OutboxState.objects.filter(pk__in=[s.pk for s in states]).update(
            claim_token=token, due_at=lease
        )
        instances = InstanceConfig.objects.in_bulk({s.instance_id for s in states})
    held = []
    for state in states:
        state.instance = instances[state.instance_id]
        state.claim_token, state.due_at = token, lease
        held.append(Held(state=state, token=token))
    return held


def new_token() -> str:
    from uuid import uuid4

    return uuid4().hex


def release(*, instance_id: int, token: str, due_at: datetime | None = None) -> None:
    """Let an outbox go: due at `due_at`, else when its next queued row is."""
    with transaction.atomic():
        if due_at is None:
            due_at = next_due(instance_id=instance_id)
        OutboxState.objects.filter(instance_id=instance_id, claim_token=token).update(
            claim_token="", due_at=due_at
        )


def next_due(*, instance_id: int) -> datetime | None:
    queued = OutboundMessage.objects.filter(instance_id=instance_id, status=OutboundStatus.QUEUED)
    return queued.order_by(*ORDER).values_list("next_attempt_at", flat=True).first()


# --- the next step of a held outbox ------------------------------------------------
class Action(Enum):
    LOST = "lost"  # another dispatcher holds it now
    RELEASED = "released"  # nothing to do before `until` (or at all)
    CHECK = "check"  # `row` may have reached Evolution: ask before anything else
    WAIT = "wait"  # `row` is next, after a paced wait until `until`
    SEND = "send"  # `row` is marked sending: call Evolution now; the next not before `until`


@dataclass(frozen=True)
class Next:
    action: Action
    row: OutboundMessage | None = None
    until: datetime | None = None
    # SEND: when to post it (its paced time; the row is `sending` already).
    at: datetime | None = None
    # Why a WAIT or RELEASED waits (metrics): interval, daily_limit, paused, scheduled.
    reason: str = ""
    # The instance's latest message Evolution has (for findMessages' "keeps no messages").
    probe_id: str | None = None
    # SEND: the outbox had failures or a backoff to reset when this one succeeds.
    failing: bool = False


def daily_limit_today(*, instance: InstanceConfig, first_day: date | None, today: date) -> int:
    """The instance's daily API send limit today, warm-up applied (0: none).

    Day 0 of the warm-up is the day of the first API send: 10 % of the limit,
    rising in equal steps to 100 % on day `warmup_days`.
    """
    limit = instance.daily_send_limit
    if not limit or not instance.warmup_days:
        return limit
    day = 0 if first_day is None else (today - first_day).days
    if day >= instance.warmup_days:
        return limit
    share = 0.1 + 0.9 * day / instance.warmup_days
    return max(1, int(limit * share))


def last_send_at(
    *, state: OutboxState, instance_id: int, now: datetime, window: float
) -> datetime | None:
    """The instance's last send of any kind: the dispatcher's own, or a reply's row
    (written `sending` just before it goes). Replies are read only within the
    pacing window, on the created_at index (every instance's replies of the last
    second or so, picked here: filtered on the instance, the database would
    walk all of the instance's rows on another index)."""
    since = now - timedelta(seconds=window)
    recent = OutboundMessage.objects.filter(
        created_at__gte=since, kind=OutboundKind.REPLY
    ).order_by()
    times = [at for pk, at in recent.values_list("instance_id", "created_at") if pk == instance_id]
    reply = max(times) if times else None
    candidates = [at for at in (state.last_send_at, reply) if at is not None]
    return max(candidates) if candidates else None


def next_step(
    *,
    instance_id: int,
    token: str,
    instance: InstanceConfig | None = None,
    check_doubt: bool = True,
) -> Next:
    """What a dispatcher holding this outbox does next; marks the row `sending`
    (committed before the call) when it is time to send it. `instance`: the
    settings as read when the outbox was claimed (read here when not given).
    `check_doubt=False`: the holder knows no row can be in doubt (see the
    dispatcher), and the look for one is skipped."""
    now = timezone.now()
    with transaction.atomic():
        state = (
            OutboxState.objects.select_for_update()
            .filter(instance_id=instance_id, claim_token=token)
            .first()
        )
        if state is None:
            return Next(Action.LOST)
        if instance is None:
            instance = InstanceConfig.objects.get(pk=instance_id)
        if state.paused_until and state.paused_until > now:
            _release_state(state, due_at=state.paused_until)
            return Next(Action.RELEASED, until=state.paused_until, reason="paused")
        if _not_connected(instance_id=instance_id):
            # As replies are held (transitions.NOT_CONNECTED): nothing is tried while
            # Evolution says the number is not connected; "open" makes it due at once.
            until = now + timedelta(seconds=NOT_CONNECTED_RECHECK)
            _release_state(state, due_at=until)
            return Next(Action.RELEASED, until=until, reason="not_connected")
        doubt = _in_doubt(instance_id=instance_id) if check_doubt else None
        if doubt is not None:
            return Next(Action.CHECK, row=doubt, probe_id=_probe_id(instance_id=instance_id))
        row, limit_reason = _next_row(state=state, instance=instance, now=now)
        if row is None:
            due = next_due(instance_id=instance_id)
            if limit_reason and due is not None:
                due = max(due, _tomorrow(now))
            _release_state(state, due_at=due)
            return Next(Action.RELEASED, until=due, reason=limit_reason or "scheduled")
        gap = timedelta(milliseconds=state.next_gap_ms)
        interval = instance.send_interval_ms / 1000 * JITTER[1]
        last = last_send_at(state=state, instance_id=instance_id, now=now, window=interval)
        if last is not None and state.next_gap_ms == 0 and instance.send_interval_ms:
            # A reply went last (no gap chosen by the dispatcher): one interval after it.
            gap = timedelta(milliseconds=instance.send_interval_ms)
        at = now
        if last is not None and now < last + gap:
            ready = last + gap
            if (ready - now).total_seconds() > MAX_HELD_WAIT:
                _release_state(state, due_at=ready)
                return Next(Action.RELEASED, until=ready, reason="interval")
            if ready - now > SEND_LEAD:
                return Next(Action.WAIT, row=row, until=ready, reason="interval")
            at = ready
        gap_ms = _mark_sending(state=state, instance=instance, row=row, now=at)
        failing = bool(state.failures_in_row or state.backoff_minutes)
        until = at + timedelta(milliseconds=gap_ms)
        return Next(Action.SEND, row=row, until=until, at=at, failing=failing)


def _not_connected(*, instance_id: int) -> bool:
    return ConnectionState.objects.filter(instance_id=instance_id, state__in=NOT_CONNECTED).exists()


def connected_again(*, instance_id: int) -> None:
    """connection.update "open": an outbox with work waiting is due now."""
    OutboxState.objects.filter(
        instance_id=instance_id, claim_token="", due_at__isnull=False
    ).update(due_at=timezone.now())


def _in_doubt(*, instance_id: int) -> OutboundMessage | None:
    """The instance's first outbox send left `sending` or `unconfirmed`, on the
    partial index webhooks_outbox_in_doubt. Its condition is written out as
    literals: SQLite uses a partial index only when the query names its
    condition's values, not parameters (an ORM filter walked all the instance's
    rows on webhooks_outbound_chat)."""
    meta = OutboundMessage._meta
    sql = (
        f"SELECT id FROM {meta.db_table} WHERE instance_id = %s "
        "AND kind IN ('api', 'operator') AND status IN ('sending', 'unconfirmed') "
        "ORDER BY id LIMIT 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [instance_id])
        found = cursor.fetchone()
    return None if found is None else OutboundMessage.objects.get(pk=found[0])


def _next_row(
    *, state: OutboxState, instance: InstanceConfig, now: datetime
) -> tuple[OutboundMessage | None, str]:
    """The next due queued row (operator sends first, then in the order accepted);
    an API send over today's limit waits for tomorrow and says so."""
    queued = OutboundMessage.objects.filter(
        instance_id=instance.pk, status=OutboundStatus.QUEUED, next_attempt_at__lte=now
    )
    row = queued.filter(kind=OutboundKind.OPERATOR).order_by(*ORDER).first()
    if row is not None:
        return row, ""
    row = queued.order_by(*ORDER).first()
    if row is None:
        return None, ""
    today = now.date()
    limit = daily_limit_today(instance=instance, first_day=state.first_send_day, today=today)
    sent_today = state.sends_today if state.sends_day == today else 0
    if row.kind == OutboundKind.API and limit and sent_today >= limit:
        reason = (
            f"daily send limit reached ({sent_today} of {limit} today): waits for "
            f"{_tomorrow(now):%Y-%m-%d}"
        )
        # Said on the due rows once (wait_reason blank), not rewritten on every look.
        queued.filter(kind=OutboundKind.API).exclude(wait_reason=reason).update(wait_reason=reason)
        return None, "daily_limit"
    return row, ""


def _tomorrow(now: datetime) -> datetime:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start + timedelta(days=1)


def _mark_sending(
    *, state: OutboxState, instance: InstanceConfig, row: OutboundMessage, now: datetime
) -> int:
    """The row `sending`, the instance's pacing moved on; the gap to the next send (ms)."""
    OutboundMessage.objects.filter(pk=row.pk, status=OutboundStatus.QUEUED).update(
        status=OutboundStatus.SENDING,
        attempts=row.attempts + 1,
        attempt_started_at=now,
        wait_reason="",
    )
    row.status, row.attempts, row.attempt_started_at = OutboundStatus.SENDING, row.attempts + 1, now
    gap_ms = int(instance.send_interval_ms * random.uniform(*JITTER))
    fields: dict[str, Any] = {
        "last_send_at": now,
        "next_gap_ms": gap_ms,
        "due_at": now + timedelta(seconds=lease_seconds()),
    }
    if row.kind == OutboundKind.API:
        today = now.date()
        fields["sends_today"] = (state.sends_today if state.sends_day == today else 0) + 1
        fields["sends_day"] = today
        if state.first_send_day is None:
            fields["first_send_day"] = today
    OutboxState.objects.filter(pk=state.pk).update(**fields)
    return gap_ms


def _release_state(state: OutboxState, *, due_at: datetime | None) -> None:
    OutboxState.objects.filter(pk=state.pk, claim_token=state.claim_token).update(
        claim_token="", due_at=due_at
    )


def _probe_id(*, instance_id: int) -> str | None:
    """The Evolution id of the instance's latest message sent (Evolution keeps it
    unless it keeps no messages at all); None when it has sent none."""
    found = (
        OutboundMessage.objects.filter(instance_id=instance_id)
        .exclude(evolution_id="")
        .order_by("-id")
        .values_list("evolution_id", flat=True)
        .first()
    )
    return found or None


def renew(*, instance_id: int, token: str) -> bool:
    lease = timezone.now() + timedelta(seconds=lease_seconds())
    return bool(
        OutboxState.objects.filter(instance_id=instance_id, claim_token=token).update(due_at=lease)
    )


# --- the outcome of a send --------------------------------------------------------
class Outcome(Enum):
    SENT = "sent"
    FAILED = "failed"  # refused for good (a 4xx): kept with the error
    RETRY = "retry"  # not sent (429/5xx, unreachable): queued again, in its place
    RATE_LIMITED = "rate_limited"  # WhatsApp's rate limit: queued again, the instance paused
    UNCONFIRMED = "unconfirmed"  # no answer: checked with findMessages before it goes again


@dataclass(frozen=True)
class Finished:
    outcome: Outcome
    # Set when the instance was paused by this outcome.
    paused_until: datetime | None = None


def is_rate_limit(error: str) -> bool:
    """Evolution passes WhatsApp's `rate-overlimit` on in its error body."""
    return RATE_LIMIT_MARKER in error.lower()


def finish_send(
    *,
    row_id: int,
    attempt: int,
    instance_id: int,
    token: str,
    outcome: Outcome,
    evolution_id: str = "",
    error: str = "",
    posted_late_at: datetime | None = None,
    failing: bool = True,
) -> Finished:
    """Record what the Evolution call did. The row is written whoever holds the
    outbox now (it is the truth about the call), if it is still this attempt's.
    `posted_late_at`: when the call was posted, given when that was after its
    paced time; the next send is paced from it. `failing=False`: the outbox had
    no failures to reset when the send was taken (Next.failing)."""
    now = timezone.now()
    with transaction.atomic():
        if posted_late_at is not None:
            # The pace is kept between the posts themselves: a send posted late
            # (a busy loop, a slow database) must not bring the next one closer.
            OutboxState.objects.filter(
                instance_id=instance_id, last_send_at__lt=posted_late_at
            ).update(last_send_at=posted_late_at)
        mine = OutboundMessage.objects.filter(
            pk=row_id, attempts=attempt, status=OutboundStatus.SENDING
        )
        if outcome is Outcome.SENT:
            # The last error stays: a 5xx before, or "may be a duplicate" from a check.
            if mine.update(
                status=OutboundStatus.SENT, evolution_id=evolution_id[:128], sent_at=now
            ):
                queue_status_callback(outbound_id=row_id, status=OutboundStatus.SENT, at=now)
            # A success ends a run of failures and resets the backoff.
            if failing:
                OutboxState.objects.filter(instance_id=instance_id).exclude(
                    failures_in_row=0, backoff_minutes=0
                ).update(failures_in_row=0, backoff_minutes=0)
            return Finished(outcome)
        if outcome is Outcome.FAILED:
            if mine.update(status=OutboundStatus.FAILED, error=error):
                queue_status_callback(outbound_id=row_id, status=OutboundStatus.FAILED, at=now)
            return Finished(outcome)
        if outcome is Outcome.UNCONFIRMED:
            mine.update(status=OutboundStatus.UNCONFIRMED, error=error)
            return Finished(outcome)
        state = OutboxState.objects.select_for_update().filter(instance_id=instance_id).first()
        instance = InstanceConfig.objects.get(pk=instance_id)
        failures = (state.failures_in_row if state else 0) + 1
        pause = outcome is Outcome.RATE_LIMITED or failures >= FAILURES_BEFORE_PAUSE
        if not pause:
            mine.update(status=OutboundStatus.QUEUED, error=error)
            OutboxState.objects.filter(instance_id=instance_id).update(failures_in_row=failures)
            return Finished(Outcome.RETRY)
        previous = state.backoff_minutes if state else 0
        minutes = min(
            MAX_SEND_BACKOFF_MINUTES,
            previous * 2 if previous else instance.send_backoff_minutes,
        )
        until = now + timedelta(minutes=minutes)
        why = (
            f"WhatsApp's rate limit ({error[:120]}): sends paused {minutes} min"
            if outcome is Outcome.RATE_LIMITED
            else f"{failures} failed sends in a row ({error[:120]}): sends paused {minutes} min"
        )
        mine.update(status=OutboundStatus.QUEUED, error=error, wait_reason=why[:200])
        OutboxState.objects.filter(instance_id=instance_id).update(
            failures_in_row=0,
            backoff_minutes=minutes,
            paused_until=until,
            pause_reason=why[:200],
        )
        return Finished(Outcome.RATE_LIMITED, paused_until=until)


def settle_in_doubt(*, row_id: int, sent_id: str = "", note: str = "") -> None:
    """A row left sending/unconfirmed, once Evolution was asked: `sent` with the id
    found, else queued again in its place (it goes before anything after it)."""
    doubt = OutboundMessage.objects.filter(pk=row_id, status__in=IN_DOUBT)
    if sent_id:
        now = timezone.now()
        with transaction.atomic():
            if doubt.update(status=OutboundStatus.SENT, evolution_id=sent_id[:128], sent_at=now):
                queue_status_callback(outbound_id=row_id, status=OutboundStatus.SENT, at=now)
    else:
        doubt.update(status=OutboundStatus.QUEUED, error=note)


# --- delivery and read receipts (messages.update) -----------------------------------------
DELIVERED_STATES = {"DELIVERY_ACK", "3"}
READ_STATES = {"READ", "PLAYED", "4", "5"}


def record_status_updates(*, instance_id: int, updates: list[tuple[str, str]]) -> int:
    """Evolution's messages.update for messages the hub sent: delivered, then read.
    Only forward (a late DELIVERY_ACK leaves a read row read); how many rows moved."""
    now = timezone.now()
    moved = 0
    for key_id, status in updates:
        rows = OutboundMessage.objects.filter(instance_id=instance_id, evolution_id=key_id)
        if status in READ_STATES:
            new = OutboundStatus.READ
            rows = rows.filter(status__in=(OutboundStatus.SENT, OutboundStatus.DELIVERED))
            change: dict[str, Any] = {
                "read_at": now,
                "delivered_at": Coalesce("delivered_at", now),
            }
        elif status in DELIVERED_STATES:
            new = OutboundStatus.DELIVERED
            rows = rows.filter(status=OutboundStatus.SENT)
            change = {"delivered_at": now}
        else:
            continue
        with transaction.atomic():
            # The callback goes for the sends an integration made (API, operator),
            # not for every reply's receipts.
            told = list(rows.exclude(kind=OutboundKind.REPLY).values_list("pk", flat=True))
            moved += rows.update(status=new, **change)
            for outbound_id in told:
                queue_status_callback(outbound_id=outbound_id, status=new, at=now)
    return moved


# --- metrics, read at scrape time ----------------------------------------------------
def outbox_stats(*, since: datetime) -> dict[str, dict[str, float]]:
    """Per instance name: queued depth, and the delivered and read ratios of the
    messages sent since `since` (created_at index: a range of rows)."""
    from django.db.models import Count

    stats: dict[str, dict[str, float]] = {}
    depth = (
        OutboundMessage.objects.filter(status=OutboundStatus.QUEUED)
        .order_by()
        .values_list("instance__name")
        .annotate(n=Count("id"))
    )
    for name, count in depth:
        stats.setdefault(name, {})["depth"] = count
    recent = (
        OutboundMessage.objects.filter(
            created_at__gte=since,
            status__in=(OutboundStatus.SENT, OutboundStatus.DELIVERED, OutboundStatus.READ),
        )
        .order_by()
        .values_list("instance__name", "status")
        .annotate(n=Count("id"))
    )
    totals: dict[str, dict[str, int]] = {}
    for name, status, count in recent:
        totals.setdefault(name, {})[status] = count
    for name, counts in totals.items():
        sent = sum(counts.values())
        delivered = counts.get("delivered", 0) + counts.get("read", 0)
        entry = stats.setdefault(name, {})
        entry["delivered_ratio"] = delivered / sent if sent else 0.0
        entry["read_ratio"] = counts.get("read", 0) / sent if sent else 0.0
    return stats
