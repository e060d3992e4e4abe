"""Every change of state of a message and of a conversation, in one place.

The webhook (ingest), the worker, the admin's and the API's actions and the
CLI call these; nothing else writes a message's status or a conversation's
lease, pause or session. They are synchronous and run inside the caller's
transaction (on the database thread for the async callers, see webhooks/db.py).

A worker holds a conversation (one chat) by its claim token; while it does,
`due_at` is the end of its lease. The messages it handles carry the same
token, so every write to them is conditional on still holding the chat.
"""

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

from django.conf import settings
from django.db import transaction
from django.db.models import Case, Exists, F, OuterRef, Q, QuerySet, Value, When
from django.utils import timezone

from instances.models import InstanceConfig, Route
from webhooks import rows
from webhooks.chat_rules import OpenMessage, OwnerAction, debounce_limit, due_time
from webhooks.models import (
    Conversation,
    InboundMessage,
    OutboundStatus,
    PauseReason,
    Status,
)
from webhooks.routing import Routing
from webhooks.rows import update_claimed_row
from webhooks.wakeup import wake_up

MAX_CLAIMS = 100
OPEN = (Status.QUEUED, Status.PROCESSING)
# Candidates read per claim, per free slot: room to skip chats of tenants at
# their max_concurrent without reading the whole due list.
CANDIDATES_PER_SLOT = 4


def new_claim_token() -> str:
    return uuid4().hex


def lease_for(*, agent_timeout: int, now: datetime) -> datetime:
    seconds = agent_timeout + settings.EVOLUTION_TIMEOUT + settings.WORKER_LEASE_MARGIN
    return now + timedelta(seconds=seconds)


@dataclass
class Batch:
    """A conversation a worker holds, with the open messages it took, in order."""

    conversation: Conversation
    token: str
    messages: list[InboundMessage] = field(default_factory=list)
    # The instance's routing, read by the worker when it first needs it.
    routing: Routing | None = None

    @property
    def instance(self) -> InstanceConfig:
        return self.conversation.instance


# --- claiming -----------------------------------------------------------------
def claim_conversations(*, limit: int) -> list[Batch]:
    """Take up to `limit` due conversations and their due open messages.

    Tenants at their max_concurrent are skipped, and the others share the
    slots in turn (the tenant whose chat waited longest first), so one tenant's
    backlog never holds every slot. Reads only due and leased conversations:
    its cost does not grow with the stored messages.
    """
    now = timezone.now()
    # The worker looks after every message it finishes; while the webhooks claim
    # new chats for it there is usually nothing due, and this one indexed
    # statement answers instead of the three below.
    if not rows.any_conversation_due(now=now):
        return []
    with transaction.atomic():
        # Counted here rather than with GROUP BY, which SQLite serves by walking
        # an index on instance_id over every conversation.
        leased = Counter(
            Conversation.objects.filter(due_at__gt=now)
            .exclude(claim_token="")
            .values_list("instance_id", flat=True)
        )
        limits = dict(
            InstanceConfig.objects.filter(pk__in=leased).values_list("pk", "max_concurrent")
        )
        full = [pk for pk, count in leased.items() if count >= limits.get(pk, 0)]
        candidates = list(
            Conversation.objects.filter(due_at__lte=now)
            .exclude(instance_id__in=full)
            .order_by("due_at")
            .select_for_update(skip_locked=True)[: limit * CANDIDATES_PER_SLOT]
        )
        # Each tenant read once, not once per candidate (a join built one
        # instance of 30 fields for each of up to limit * 4 rows).
        # has_routes in the same statement: an instance without routing rules
        # costs the worker no read of them (webhooks/processing.py).
        instances = InstanceConfig.objects.annotate(
            has_routes=Exists(Route.objects.filter(instance_id=OuterRef("pk")))
        ).in_bulk({c.instance_id for c in candidates})
        for conversation in candidates:
            conversation.instance = instances[conversation.instance_id]
        chosen = _share_fairly(candidates, leased=leased, limit=limit)
        token = new_claim_token()
        batches = [_take(conversation, token=token, now=now) for conversation in chosen]
    return [batch for batch in batches if batch.messages]


def _share_fairly(
    candidates: list[Conversation], *, leased: Counter[int], limit: int
) -> list[Conversation]:
    queues: dict[int, list[Conversation]] = defaultdict(list)
    for conversation in candidates:
        queues[conversation.instance_id].append(conversation)
    room = {
        pk: queue[0].instance.max_concurrent - leased.get(pk, 0) for pk, queue in queues.items()
    }
    chosen: list[Conversation] = []
    while len(chosen) < limit and queues:
        for pk in list(queues):
            if room[pk] <= 0 or not queues[pk]:
                del queues[pk]
                continue
            chosen.append(queues[pk].pop(0))
            room[pk] -= 1
            if len(chosen) == limit:
                break
    return chosen


def _take(conversation: Conversation, *, token: str, now: datetime) -> Batch:
    """Lease a claimed conversation and take its due open messages (see _take_due)."""
    lease = lease_for(agent_timeout=conversation.instance.agent_timeout, now=now)
    rows.lease_conversation(conversation_id=conversation.pk, token=token, lease=lease)
    conversation.claim_token, conversation.due_at, conversation.due_limit = token, lease, None
    taken = _take_due(conversation, token=token, now=now)
    return Batch(conversation=conversation, token=token, messages=taken)


def _take_due(conversation: Conversation, *, token: str, now: datetime) -> list[InboundMessage]:
    """Mark a held chat's due open messages as being handled, or let the chat go.

    The open messages are taken in order up to the first one that is not due
    (waiting for a retry): it holds back the rest of its chat. With debounce
    on, none is due before the burst's window has closed. Messages found
    `processing` belong to a worker whose lease on the chat ran out. With
    nothing due, the chat is released, due again when its next message is.
    """
    instance = conversation.instance
    debounce = instance.debounce_seconds
    if not debounce:
        # One message, one answer, one lease: the first, if due, in one statement.
        lease = lease_for(agent_timeout=instance.agent_timeout, now=now)
        first = rows.take_first_open(
            instance_id=conversation.instance_id,
            chat_jid=conversation.chat_jid,
            token=token,
            lease=lease,
            now=now,
        )
        if first is not None:
            _hold_until(conversation, token=token, lease=lease)
            first.instance = instance
            return [first]
        # None open, or the first waits for its retry: read them for the release.
    opens = rows.open_messages(instance_id=conversation.instance_id, chat_jid=conversation.chat_jid)
    due = due_time(open_messages=_waiting(opens), debounce_seconds=debounce, now=now)
    if due is None or due > now:
        _let_go(conversation, token=token, opens=opens, now=now)
        return []
    taken: list[InboundMessage] = []
    for message in opens:
        if message.status == Status.QUEUED and (message.next_attempt_at or now) > now:
            break
        taken.append(message)
        if not debounce:
            # One message, one answer, one lease: the next is taken after it.
            break
    lease = lease_for(agent_timeout=instance.agent_timeout, now=now)
    _hold_until(conversation, token=token, lease=lease)
    rows.take_messages(pks=[m.pk for m in taken], token=token, lease=lease)
    for message in taken:
        message.status, message.claim_token, message.lease_until = Status.PROCESSING, token, lease
        message.attempts += 1
        message.instance = instance
    return taken


def _hold_until(conversation: Conversation, *, token: str, lease: datetime) -> None:
    """The held chat's lease to cover the messages just taken (unless it does)."""
    if conversation.due_at != lease:
        rows.renew_conversation_lease(conversation_id=conversation.pk, token=token, lease=lease)
        conversation.due_at = lease


# No savepoint: inside the database thread's transaction this needs only to be
# part of it (a failure fails the batch, which runs again call by call); a
# savepoint would cost two statements per message.
@transaction.atomic(savepoint=False)
def take_more_or_settle(*, conversation: Conversation, token: str) -> list[InboundMessage]:
    """A worker done with its messages: the chat's next due ones, or the chat let go.

    Messages stored while the chat was held left its due time alone; they are
    found here. On PostgreSQL the row is locked first, so that such a message
    is either seen here or sees the released chat.
    """
    if rows.let_go_if_done(
        conversation_id=conversation.pk,
        token=token,
        instance_id=conversation.instance_id,
        chat_jid=conversation.chat_jid,
    ):
        # The usual case, one statement: nothing came meanwhile.
        return []
    if not rows.holds_conversation(conversation_id=conversation.pk, token=token):
        return []
    return _take_due(conversation, token=token, now=timezone.now())


@transaction.atomic(savepoint=False)
def settle_conversation(*, conversation: Conversation, token: str) -> None:
    """Let a held conversation go, due again when its next open message is."""
    if rows.holds_conversation(conversation_id=conversation.pk, token=token):
        opens = rows.open_messages(
            instance_id=conversation.instance_id, chat_jid=conversation.chat_jid
        )
        _let_go(conversation, token=token, opens=opens, now=timezone.now())


def _waiting(opens: list[InboundMessage]) -> list[OpenMessage]:
    return [
        OpenMessage(
            next_attempt_at=m.next_attempt_at if m.status == Status.QUEUED else None,
            queued_at=m.queued_at or m.received_at,
        )
        for m in opens
    ]


def _let_go(
    conversation: Conversation, *, token: str, opens: list[InboundMessage], now: datetime
) -> None:
    """Release a held chat, due when its open messages are (a retry's, a burst's)."""
    debounce = conversation.instance.debounce_seconds
    waiting = _waiting(opens)
    due = due_time(open_messages=waiting, debounce_seconds=debounce, now=now)
    limit = None
    if waiting and debounce:
        limit = debounce_limit(first_queued_at=waiting[0].queued_at, debounce_seconds=debounce)
    Conversation.objects.filter(pk=conversation.pk, claim_token=token).update(
        claim_token="", due_at=due, due_limit=limit
    )


# --- the worker's writes to a message it holds -----------------------------------
@dataclass(frozen=True)
class SendStart:
    """A reply part about to go out: noted on its message before the send, so its
    echo is known and a send cut short is checked before it goes again."""

    chat_jid: str
    text: str
    started_at: datetime = field(default_factory=timezone.now)


@dataclass(frozen=True)
class SendEnd:
    """A send's outcome. `start`: the send noted by a SendStart, recorded now as
    an outbound row; `outbound_id`: an earlier attempt's row, settled."""

    evolution_id: str
    ok: bool
    start: SendStart | None = None
    outbound_id: int | None = None
    error: str = ""
    # Failed without Evolution's answer: it may have been sent (see OutboundStatus).
    unconfirmed: bool = False

    @property
    def status(self) -> OutboundStatus:
        if self.ok:
            return OutboundStatus.SENT
        return OutboundStatus.UNCONFIRMED if self.unconfirmed else OutboundStatus.FAILED


def save_claimed(
    *,
    message_pk: int,
    token: str,
    fields: dict[str, Any],
    conversation_id: int,
    send_start: SendStart | None = None,
    send_end: SendEnd | None = None,
    instance_id: int | None = None,
) -> tuple[bool, bool]:
    """Write fields to a message this worker holds, and what goes with them.

    Returns (whether the claim still held, whether `send_start`'s send may go:
    False while the instance's last connection.update says it is not connected,
    and nothing of it is written). Runs only database writes: webhooks/db.py may
    run it twice, so `fields` is copied, never changed.
    """
    may_send = False
    written = dict(fields)
    if send_end is not None and send_end.start is not None:
        written.update(sending_text=None, send_started_at=None)
    if send_start is not None:
        assert instance_id is not None
        # Not noted, and not sent, while the number is not connected.
        held, may_send = rows.update_claimed_row_before_send(
            pk=message_pk,
            claim_token=token,
            fields=written,
            instance_id=instance_id,
            not_connected=NOT_CONNECTED,
            text=send_start.text,
            started_at=send_start.started_at,
        )
    else:
        held = update_claimed_row(pk=message_pk, claim_token=token, fields=written)
    if not held:
        return False, False
    if send_end is not None and send_end.start is not None:
        # After the send, with its outcome: nothing between the agent's answer
        # and the sendText but the message's own row.
        assert instance_id is not None
        rows.record_send(
            instance_id=instance_id,
            chat_jid=send_end.start.chat_jid,
            text=send_end.start.text,
            in_reply_to=message_pk,
            started_at=send_end.start.started_at,
            status=send_end.status,
            evolution_id=send_end.evolution_id,
            error=send_end.error,
        )
    elif send_end is not None:
        assert send_end.outbound_id is not None
        rows.finish_outbound(
            outbound_id=send_end.outbound_id,
            status=send_end.status,
            evolution_id=send_end.evolution_id,
            error=send_end.error,
        )
    return True, may_send


def save_claimed_and_take_more(
    *, conversation: Conversation, **save: Any
) -> tuple[bool, bool, list[InboundMessage] | None]:
    """save_claimed for the batch's last message, then take_more_or_settle, in one
    database call: the chat's next messages (or [], the chat let go), None when
    the claim was lost. One trip to the database thread fewer per answered message."""
    held, may_send = save_claimed(**save)
    if not held:
        return False, may_send, None
    return True, may_send, take_more_or_settle(conversation=conversation, token=save["token"])


HOLD_REASON = "waiting for connection"
# Evolution's states in which a sendText cannot go out (2.3.7 holds it ~60 s
# and answers 500 while `connecting`, 500 at once while `close`).
NOT_CONNECTED = ("close", "connecting")


def connected_again(*, instance_id: int) -> int:
    """The number is connected again: its held replies are due now; how many."""
    now = timezone.now()
    held = InboundMessage.objects.filter(
        instance_id=instance_id, status=Status.QUEUED, ignore_reason=HOLD_REASON
    )
    chats = set(held.values_list("chat_jid", flat=True))
    count = held.update(next_attempt_at=now, ignore_reason="")
    for chat_jid in chats:
        make_chat_due(instance_id=instance_id, chat_jid=chat_jid, now=now)
    return count


def fold_into(
    *, folded_pks: list[int], answering_pk: int, token: str, burst_content: dict[str, Any]
) -> None:
    """Messages of a debounced burst: answered by the last one's agent call."""
    now = timezone.now()
    InboundMessage.objects.filter(pk__in=folded_pks, claim_token=token).update(
        status=Status.IGNORED,
        ignore_reason="debounced",
        answered_by_id=answering_pk,
        finished_at=now,
        claim_token="",
        lease_until=None,
        next_attempt_at=None,
        reply_api_key="",
    )
    InboundMessage.objects.filter(pk=answering_pk, claim_token=token).update(content=burst_content)


def release_messages(
    *, messages: Iterable[InboundMessage], error: str = "", delay: float = 0.0
) -> None:
    """Give held messages back to the queue (shutdown, or a crash in our code)."""
    now = timezone.now()
    for message in messages:
        fields: dict[str, object] = {
            "status": Status.QUEUED,
            "claim_token": "",
            "lease_until": None,
            "next_attempt_at": now + timedelta(seconds=delay),
        }
        if error:
            fields["last_error"] = error
        if message.attempts >= MAX_CLAIMS:
            fields.update(status=Status.FAILED, finished_at=now, next_attempt_at=None)
        InboundMessage.objects.filter(
            pk=message.pk, claim_token=message.claim_token, status=Status.PROCESSING
        ).update(**fields)


@transaction.atomic(savepoint=False)
def release_batch(*, batch: Batch, error: str = "", delay: float = 0.0) -> None:
    release_messages(messages=batch.messages, error=error, delay=delay)
    settle_conversation(conversation=batch.conversation, token=batch.token)


def renew_lease(*, conversation_id: int, token: str, agent_timeout: int) -> None:
    """Another agent call and send ahead: the chat's lease covers them too."""
    lease = lease_for(agent_timeout=agent_timeout, now=timezone.now())
    rows.renew_conversation_lease(conversation_id=conversation_id, token=token, lease=lease)


def advance_session(*, conversation_id: int) -> int:
    """A new agent session for the chat (reset); returns its number.

    It ends the chat's binding to a routed agent: the next message is routed
    afresh (the idle expiry does the same, in rows.touch_conversation).
    """
    Conversation.objects.filter(pk=conversation_id).update(
        session_epoch=F("session_epoch") + 1, bound_agent=None
    )
    return Conversation.objects.values_list("session_epoch", flat=True).get(pk=conversation_id)


def bind_agent(*, conversation_id: int, agent_id: int | None, session_epoch: int) -> bool:
    """A routing rule matched: the chat goes to this agent (None: the instance's own)
    until a reset or an idle expiry. Only within the session the message belongs
    to: a reset meanwhile wins. Whether it was written."""
    return bool(
        Conversation.objects.filter(pk=conversation_id, session_epoch=session_epoch).update(
            bound_agent_id=agent_id
        )
    )


# --- the owner's messages and the operator's actions ------------------------------
def owner_wrote(
    *, conversation_id: int, action: OwnerAction, instance: InstanceConfig, now: datetime
) -> None:
    """A fromMe message the hub did not send: a keyword, or a human answering."""
    chat = Conversation.objects.filter(pk=conversation_id)
    if action is OwnerAction.BOT_OFF:
        chat.update(pause_reason=PauseReason.BOT_OFF, paused_until=None)
    elif action is OwnerAction.BOT_ON:
        chat.update(pause_reason="", paused_until=None)
    elif instance.handoff_minutes:
        until = now + timedelta(minutes=instance.handoff_minutes)
        # A pause until resumed (bot off, or the operator's) stays one; a
        # takeover's window restarts with each of the human's messages.
        chat.filter(Q(pause_reason="") | Q(paused_until__isnull=False)).update(
            pause_reason=Case(
                When(
                    Q(pause_reason="") | Q(paused_until__lte=now),
                    then=Value(PauseReason.HUMAN.value),
                ),
                default=F("pause_reason"),
            ),
            paused_until=Case(
                When(paused_until__gt=until, then=F("paused_until")), default=Value(until)
            ),
        )


def pause_conversation(*, conversation: Conversation, minutes: int | None = None) -> Conversation:
    """The operator pauses the bot in a chat, for `minutes` or until resumed."""
    until = timezone.now() + timedelta(minutes=minutes) if minutes else None
    Conversation.objects.filter(pk=conversation.pk).update(
        pause_reason=PauseReason.OPERATOR, paused_until=until
    )
    conversation.refresh_from_db()
    return conversation


def resume_conversation(*, conversation: Conversation) -> Conversation:
    Conversation.objects.filter(pk=conversation.pk).update(pause_reason="", paused_until=None)
    conversation.refresh_from_db()
    return conversation


def reset_conversation(*, conversation: Conversation) -> Conversation:
    """Start a new agent session: the chat's next message goes to an empty memory."""
    advance_session(conversation_id=conversation.pk)
    conversation.refresh_from_db()
    return conversation


# --- retries from the console ------------------------------------------------------
# Legacy-mode rows send with the delivery's own apikey, which is cleared once
# the row is finished; while the instance still has no key of its own, a
# retry could not send (and would ask the agent again for nothing).
_NO_KEY_TO_SEND = Q(instance__legacy_mode=True, instance__evolution_url="", reply_api_key="")


def retry_messages(*, queryset_or_ids: QuerySet[InboundMessage] | Iterable[int]) -> int:
    """Put the failed messages among these back in their chats' queues; returns how many.

    Other rows are left alone. A message whose agent already answered keeps the
    reply, so only the send is retried and the agent is never asked twice. A
    retried message is handled after what is already open in its chat.
    """
    if isinstance(queryset_or_ids, QuerySet):
        ids = list(queryset_or_ids.values_list("pk", flat=True))
    else:
        ids = list(queryset_or_ids)
    now = timezone.now()
    keep_reply = Q(reply_text__isnull=False, sent_at__isnull=True)
    retryable = InboundMessage.objects.filter(pk__in=ids, status=Status.FAILED).exclude(
        _NO_KEY_TO_SEND
    )
    chats = set(retryable.values_list("instance_id", "chat_jid"))
    # One conditional UPDATE: a row another request or the worker changed in
    # the meantime is not failed any more and is not touched.
    requeued = retryable.update(
        status=Status.QUEUED,
        next_attempt_at=now,
        queued_at=now,
        claim_token="",
        lease_until=None,
        finished_at=None,
        first_send_failed_at=None,
        reply_text=Case(When(keep_reply, then=F("reply_text")), default=Value(None)),
        # Asked again, the agent gets a new message's retry budget.
        agent_attempts=Case(When(keep_reply, then=F("agent_attempts")), default=Value(0)),
    )
    for instance_id, chat_jid in chats:
        make_chat_due(instance_id=instance_id, chat_jid=chat_jid, now=now)
    if requeued:
        transaction.on_commit(wake_up)
    return requeued


def make_chat_due(*, instance_id: int, chat_jid: str, now: datetime) -> None:
    """A chat got open work outside a webhook: due now, unless a worker holds it."""
    conversation, _ = Conversation.objects.get_or_create(instance_id=instance_id, chat_jid=chat_jid)
    Conversation.objects.filter(pk=conversation.pk, claim_token="").filter(
        Q(due_at__isnull=True) | Q(due_at__gt=now)
    ).update(due_at=now)
