"""Recording a webhook delivery: find the tenant, check the token, store the row.

This runs inside the webhook request and must stay fast: no outbound call,
one read and one write. The worker does everything else.
"""

import copy
import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from instances import services
from instances.models import InstanceConfig, normalized_url
from instances.validators import EVENT_SLUGS, is_event_slug, validate_http_url
from omnihub.logging import kv
from webhooks import chat_rules, db, metrics, outbox, parsing, rows, transitions
from webhooks.models import ConnectionState, Conversation, InboundMessage, Status
from webhooks.notify import notify_new_message

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    QUEUED = "queued"
    IGNORED = "ignored"
    DUPLICATE = "duplicate"
    UNKNOWN_INSTANCE = "unknown_instance"
    BAD_TOKEN = "bad_token"
    BAD_BODY = "bad_body"
    # Not an answer: the delivery is authenticated and its body is too large
    # to parse on the database thread; the view parses it and calls store_delivery.
    AUTHENTICATED = "authenticated"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    detail: str = ""
    message_id: str = ""
    instance_name: str = ""
    # The chat, with the stored row, when it was claimed for this process's worker.
    claimed: "transitions.Batch | None" = None
    # Whether workers should look now: a queued message in a chat nobody holds
    # (a held chat's worker finds it; a debounced one is due later).
    wake: bool = False
    # With AUTHENTICATED: the instance the delivery is for.
    instance: InstanceConfig | None = None
    legacy_route: bool = False
    # One result per message when the body held several (a list-shaped data).
    messages: tuple["Result", ...] = ()


# Bodies up to this size are parsed on the database thread, in the call that
# authenticated them (one round trip); larger ones leave it free meanwhile.
INLINE_PARSE_BYTES = 64 * 1024
TOO_LARGE = "too large"
INACTIVE = "instance inactive"


@dataclass(frozen=True)
class Route:
    """What a webhook path names: an instance (None: the default) and an event suffix."""

    name: str | None
    event: str | None


def route_of(*, segment: str | None, event: str | None) -> Route | None:
    """`/webhook/evolution` and `/webhook/evolution/<event-slug>` are the default
    instance (no instance may be named like an event); `/webhook/evolution/<name>`
    and `/webhook/evolution/<name>/<event-slug>` are that instance. None: no
    instance can be meant (the suffix is not shaped like an event).
    """
    if segment is not None and segment.lower() in EVENT_SLUGS and event is None:
        return Route(name=None, event=segment.lower())
    if event is not None and not is_event_slug(event):
        return None
    return Route(name=segment, event=event.lower() if event else None)


def find_instance(*, segment: str | None, event: str | None) -> InstanceConfig | None:
    """Which tenant (active or not) a webhook path names: one indexed SELECT."""
    route = route_of(segment=segment, event=event)
    return None if route is None else rows.find_instance(name=route.name)


def token_is_valid(*, instance: InstanceConfig, given: str | None) -> bool:
    if not instance.webhook_token:
        return True
    if not given:
        return False
    # The previous token too, for a while after a rotation (Evolution's retries).
    return instance.accepts_webhook_token(given)


@dataclass(frozen=True)
class Delivery:
    """What the body says, learned before any database access (it is pure CPU)."""

    body: dict[str, Any] | None
    event: str = ""
    message: parsing.ParsedMessage | None = None
    ignore_reason: str | None = None
    problem: str = ""
    # A list-shaped data: one Delivery per message, each with its own body.
    parts: tuple["Delivery", ...] = ()


def read_delivery(raw: bytes) -> Delivery:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
        if parsing.storable_needs_walk(raw):
            body = parsing.make_storable(body)
    except (ValueError, RecursionError):
        # ParseError (too deep) is a ValueError too: not a usable JSON object.
        return Delivery(body=None)
    return understand(body)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def understand(body: Any) -> Delivery:
    if not isinstance(body, dict):
        return Delivery(body=None)
    event = parsing.event_name(body)
    if event != "messages.upsert":
        return Delivery(body=body, event=event)
    if isinstance(body.get("data"), list) and body["data"]:
        parts = tuple(_one_message(part, event) for part in parsing.message_bodies(body))
        return Delivery(body=body, event=event, parts=parts)
    return _one_message(body, event)


def _one_message(body: dict[str, Any], event: str) -> Delivery:
    try:
        message = parsing.parse_message(body)
    except parsing.ParseError as exc:
        return Delivery(body=body, event=event, problem=f"not a usable message: {exc}")
    reason = parsing.ignore_reason(
        message, now=timezone.now().timestamp(), max_age_seconds=settings.MESSAGE_MAX_AGE
    )
    return Delivery(body=body, event=event, message=message, ignore_reason=reason)


def too_large_delivery(*, prefix: bytes, size: int) -> Delivery:
    """A body over WEBHOOK_MAX_BODY_BYTES, from what its first bytes say.

    A message whose key is found there is stored as ignored ("too large"), so
    that the message log shows it was received; nothing else of it is kept.
    """
    stub = parsing.peek_envelope(prefix)
    if stub is None:
        return Delivery(body={}, problem=f"{TOO_LARGE} ({size} bytes); no event found")
    stub["omnihub"] = {"too_large_bytes": size}
    event = parsing.event_name(stub)
    if event != "messages.upsert":
        return Delivery(body=stub, event=event, problem=f"{TOO_LARGE} ({size} bytes)")
    try:
        message = parsing.parse_message(stub)
    except parsing.ParseError as exc:
        return Delivery(
            body=stub, event=event, problem=f"{TOO_LARGE} ({size} bytes); no message key: {exc}"
        )
    return Delivery(body=stub, event=event, message=message, ignore_reason=TOO_LARGE)


def authenticate_delivery(
    *,
    segment: str | None,
    event: str | None,
    token: str | None,
    raw: bytes,
    size: int | None = None,
    claim: bool = False,
) -> "Result | db.Then":
    """What accept_delivery does before it writes: the answer to a delivery that
    is not stored, or the store that is left to do. It only reads."""
    route = route_of(segment=segment, event=event)
    instance = None if route is None else rows.find_instance(name=route.name)
    if route is None or instance is None:
        return Result(Outcome.UNKNOWN_INSTANCE, "Unknown instance.")
    if not token_is_valid(instance=instance, given=token):
        return Result(Outcome.BAD_TOKEN, "Missing or wrong webhook token.", "", instance.name)
    if size is not None and size > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
        delivery = too_large_delivery(prefix=raw, size=size)
        logger.warning("webhook too large instance=%s bytes=%d", instance.name, size)
    elif len(raw) > INLINE_PARSE_BYTES:
        return Result(
            Outcome.AUTHENTICATED,
            instance_name=instance.name,
            instance=instance,
            legacy_route=route.name is None,
        )
    else:
        delivery = read_delivery(raw)
    return db.Then(
        store_delivery,
        {
            "instance": instance,
            "legacy_route": route.name is None,
            "delivery": delivery,
            "claim": claim,
        },
    )


# On the database thread the lookup, the token and the parse run before the
# batch takes the write lock (webhooks/db.py).
@db.first_step(authenticate_delivery)
def accept_delivery(
    *,
    segment: str | None,
    event: str | None,
    token: str | None,
    raw: bytes,
    size: int | None = None,
    claim: bool = False,
) -> Result:
    """Authenticate a delivery, then read and store it.

    The path and the token are checked before the body is looked at, so an
    unknown or unauthenticated delivery costs one indexed SELECT and no parse.
    `size` is the body's full length when `raw` is only its beginning (over
    WEBHOOK_MAX_BODY_BYTES).
    """
    step = authenticate_delivery(
        segment=segment, event=event, token=token, raw=raw, size=size, claim=claim
    )
    return step if isinstance(step, Result) else step.fn(**step.kwargs)


def store_delivery(
    *, instance: InstanceConfig, legacy_route: bool, delivery: Delivery, claim: bool = False
) -> Result:
    """Store an authenticated delivery for its instance."""
    if delivery.body is None:
        return Result(Outcome.BAD_BODY, "The body must be a JSON object.", "", instance.name)
    if legacy_route:
        foreign = foreign_instance_reason(default=instance, body=delivery.body)
        if foreign is not None:
            logger.info("webhook of another instance on the legacy route: %s", foreign)
            return Result(Outcome.IGNORED, foreign, "", instance.name)
    if instance.is_legacy:
        # The pin is noted on a copy: the database thread may run this call
        # twice (webhooks/db.py), the second time after the first's pin was
        # rolled back, so the argument itself must stay as it came.
        instance = copy.copy(instance)
        refusal = legacy_reply_refusal(instance=instance, body=delivery.body)
        if refusal is not None:
            logger.warning(
                "legacy delivery not answered: %s", kv(instance=instance.name, reason=refusal)
            )
            if delivery.event != "messages.upsert":
                # A stranger's connection.update must not become the instance's state.
                return Result(Outcome.IGNORED, refusal, "", instance.name)
            # Kept in the log, never sent to the agent: there is nowhere to send its answer.
            delivery = _ignored(delivery, reason=refusal)
    if not instance.is_active:
        # "The bot is off": keep the message in the log, answer nothing.
        delivery = _ignored(delivery, reason=INACTIVE)
    result = record(instance=instance, delivery=delivery, claim=claim)
    return replace(result, instance_name=instance.name)


def foreign_instance_reason(*, default: InstanceConfig, body: dict[str, Any]) -> str | None:
    """Why a delivery on the legacy route is not the default instance's, if it is not.

    With Evolution's global webhook (WEBHOOK_GLOBAL_URL) every instance's
    events arrive on /webhook/evolution; only the default's own may be
    answered or change its connection state. Its own is its whatsapp_instance;
    blank, its name, except in legacy mode, where any instance that is no
    other tenant's is its own, as in the single-tenant service. A body without
    an instance cannot be told apart and is taken.
    """
    evolution_name = body.get("instance")
    if not isinstance(evolution_name, str) or not evolution_name:
        return None
    own = default.whatsapp_instance or ("" if default.is_legacy else default.name)
    if evolution_name == own:
        return None
    other = rows.instance_named_in_evolution(evolution_name=evolution_name, excluding=default.pk)
    if other is not None:
        return f"instance belongs to {other}"
    return "unknown instance" if own else None


def legacy_reply_refusal(*, instance: InstanceConfig, body: dict[str, Any]) -> str | None:
    """Why a delivery in legacy mode cannot be answered, if it cannot.

    Legacy mode replies through the server a delivery names (server_url) with
    the key it carries (apikey), as the single-tenant service did. The first
    such server is pinned on the instance; a delivery naming another one is
    not answered, so that nobody who can reach the route chooses where the
    hub sends an agent's answer.
    """
    server = _string(body.get("server_url")).strip()
    if not server or not _string(body.get("apikey")):
        return "no server_url and apikey to reply with"
    pinned = instance.legacy_server_url
    if not pinned:
        try:
            validate_http_url(server)
        except ValidationError as exc:
            return f"server_url refused: {exc.messages[0]}"[:64]
        pinned = services.pin_legacy_server(instance_id=instance.pk, server_url=server[:500])
        instance.legacy_server_url = pinned
        if pinned == server[:500]:
            logger.warning(
                "legacy reply server pinned %s", kv(instance=instance.name, server_url=pinned)
            )
    if normalized_url(server) != normalized_url(pinned):
        return "server_url is not the pinned legacy reply server"
    return None


def _ignored(delivery: Delivery, *, reason: str) -> Delivery:
    if delivery.parts:
        return replace(delivery, parts=tuple(_ignored(p, reason=reason) for p in delivery.parts))
    if delivery.message is None:
        return delivery
    return replace(delivery, ignore_reason=reason)


def record_delivery(*, instance: InstanceConfig, body: dict[str, Any]) -> Result:
    """Record a body for a known instance, as its own route does after the token check."""
    return store_delivery(instance=instance, legacy_route=False, delivery=understand(body))


def record(*, instance: InstanceConfig, delivery: Delivery, claim: bool = False) -> Result:
    assert delivery.body is not None
    if delivery.parts:
        return record_messages(instance=instance, delivery=delivery, claim=claim)
    if delivery.message is None and delivery.problem:
        return Result(Outcome.IGNORED, delivery.problem)
    if delivery.event == "connection.update":
        return record_connection_state(instance=instance, body=delivery.body)
    if delivery.event == "messages.update":
        return record_message_updates(instance=instance, body=delivery.body)
    if delivery.event != "messages.upsert":
        return Result(Outcome.IGNORED, f"event {delivery.event or '(none)'} is not handled")
    if delivery.message is None:
        return Result(Outcome.IGNORED, delivery.problem)
    return record_message(instance=instance, delivery=delivery, claim=claim)


def record_messages(*, instance: InstanceConfig, delivery: Delivery, claim: bool = False) -> Result:
    """Store each message of a list-shaped data as its own row.

    The answer is the first message's, with `messages` listing every one; it
    says "queued" when any was. At most one row is claimed for the worker: the
    view reserved one slot.
    """
    results: list[Result] = []
    claimed: transitions.Batch | None = None
    for part in delivery.parts:
        result = record(instance=instance, delivery=part, claim=claim and claimed is None)
        claimed = claimed or result.claimed
        results.append(replace(result, claimed=None))
    outcomes = {result.outcome for result in results}
    outcome = next(
        (o for o in (Outcome.QUEUED, Outcome.IGNORED, Outcome.DUPLICATE) if o in outcomes),
        Outcome.IGNORED,
    )
    first = results[0]
    return Result(
        outcome,
        first.detail if len(results) == 1 else "",
        first.message_id,
        instance.name,
        claimed,
        wake=any(result.wake for result in results),
        messages=tuple(results),
    )


def can_claim_on_insert() -> bool:
    """Whether a new message's chat may be claimed in the transaction that stores it.

    On SQLite every write transaction runs alone, so "nothing open in this
    chat" stays true until commit. On PostgreSQL two servers could store two
    messages of one chat at once, each unseen by the other's check: there the
    worker claims chats only after they are committed.
    """
    return connection.vendor == "sqlite"


def record_message(*, instance: InstanceConfig, delivery: Delivery, claim: bool = False) -> Result:
    """Store a message and note it on its chat's conversation.

    With `claim`, a chat with nothing else open is handed straight to this
    process's worker (saves the worker a claim round trip).
    """
    message = delivery.message
    body = delivery.body
    assert message is not None and body is not None
    now = timezone.now()
    reason = delivery.ignore_reason
    owner: chat_rules.OwnerAction | None = None
    chat: rows.ChatState | None = None
    token = ""
    if reason is None and message.from_me:
        reason, owner = _from_me_reason(instance=instance, message=message)
    elif reason is None:
        reason = chat_rules.access_reason(instance=instance, message=message) or _group_reason(
            instance=instance, message=message
        )
        if reason is None:
            wanted = (
                transitions.new_claim_token()
                if claim and can_claim_on_insert() and not instance.debounce_seconds
                else ""
            )
            chat = _touch(
                instance=instance,
                message=message,
                now=now,
                queueing=_queueing(instance=instance, now=now, token=wanted),
            )
            if chat.paused_now(now=now):
                reason = chat.pause_reason
            elif wanted and chat.claim_token == wanted:
                token = wanted
    row = _new_row(instance=instance, message=message, body=body, reason=reason, now=now)
    if token:
        row.status = Status.PROCESSING
        row.claim_token = token
        row.lease_until = transitions.lease_for(agent_timeout=instance.agent_timeout, now=now)
        row.attempts = 1
    if not rows.insert_message(row=row):
        if token and chat is not None:
            rows.unclaim_conversation(conversation_id=chat.id, token=token)
        return Result(Outcome.DUPLICATE, "already received", message.message_id, instance.name)
    if owner is not None:
        # Noted only once the message is known to be new: a repeated delivery
        # must not restart a takeover's window.
        owned = _touch(instance=instance, message=message, now=now)
        transitions.owner_wrote(conversation_id=owned.id, action=owner, instance=instance, now=now)
        if owner is chat_rules.OwnerAction.HUMAN and instance.handoff_minutes:
            metrics.takeovers.labels(instance.name).inc()
    # The chat was made due as it was touched; workers look now unless a worker
    # holds it (it finds the message itself) or a debounce window is open.
    wake = chat is not None and not reason and not chat.claim_token
    wake = wake and not instance.debounce_seconds
    if wake:
        notify_new_message()
    logger.info(
        "message %s",
        kv(instance=instance.name, id=message.message_id, status=row.status, reason=reason or None),
    )
    outcome = Outcome.IGNORED if reason else Outcome.QUEUED
    batch = None
    if token and chat is not None:
        row.instance = instance
        batch = transitions.Batch(
            conversation=Conversation(
                pk=chat.id,
                instance=instance,
                chat_jid=message.chat_jid,
                session_epoch=chat.session_epoch,
                bound_agent_id=chat.bound_agent_id,
                claim_token=token,
            ),
            token=token,
            messages=[row],
        )
    return Result(outcome, reason or "", message.message_id, instance.name, batch, wake)


def _from_me_reason(
    *, instance: InstanceConfig, message: parsing.ParsedMessage
) -> tuple[str, chat_rules.OwnerAction | None]:
    """Why a fromMe message is not answered, and what it means when a human wrote it."""
    if message.is_broadcast or message.is_newsletter:
        return "from_me", None
    if rows.is_own_message(
        instance_id=instance.pk,
        chat_jid=message.chat_jid,
        message_id=message.message_id,
        text=message.text,
    ):
        # The echo of the hub's own reply: never a human taking over.
        return "from_me", None
    action = chat_rules.owner_action(instance=instance, text=message.text)
    if action is chat_rules.OwnerAction.HUMAN and not instance.handoff_minutes:
        return "from_me", None
    return action.value, action


def _group_reason(*, instance: InstanceConfig, message: parsing.ParsedMessage) -> str | None:
    context = None
    if chat_rules.needs_group_context(instance=instance, message=message):
        wuid = (
            ConnectionState.objects.filter(instance=instance).values_list("wuid", flat=True).first()
        )
        quoted = (message.quoted or {}).get("id", "")
        context = chat_rules.GroupContext(
            bot_jids=chat_rules.bot_jids(instance=instance, wuid=wuid or ""),
            quotes_the_hub=bool(quoted)
            and rows.hub_sent(instance_id=instance.pk, message_id=quoted),
        )
    return chat_rules.group_reason(instance=instance, message=message, context=context)


def _queueing(*, instance: InstanceConfig, now: datetime, token: str) -> rows.Queueing:
    debounce = instance.debounce_seconds
    return rows.Queueing(
        due=now + timedelta(seconds=debounce),
        limit=chat_rules.debounce_limit(first_queued_at=now, debounce_seconds=debounce)
        if debounce
        else None,
        token=token,
        lease_until=transitions.lease_for(agent_timeout=instance.agent_timeout, now=now),
        max_concurrent=instance.max_concurrent,
    )


def _touch(
    *,
    instance: InstanceConfig,
    message: parsing.ParsedMessage,
    now: datetime,
    queueing: rows.Queueing | None = None,
) -> rows.ChatState:
    idle = instance.session_idle_minutes
    return rows.touch_conversation(
        instance_id=instance.pk,
        chat_jid=message.chat_jid,
        # The owner's own name and a group's senders do not name the chat.
        phone="" if message.is_group else message.phone,
        push_name="" if message.from_me or message.is_group else message.push_name[:256],
        is_group=message.is_group,
        now=now,
        idle_cutoff=now - timedelta(minutes=idle) if idle and not message.from_me else None,
        queueing=queueing,
    )


def _new_row(
    *,
    instance: InstanceConfig,
    message: parsing.ParsedMessage,
    body: dict[str, Any],
    reason: str | None,
    now: datetime,
) -> InboundMessage:
    row = InboundMessage(
        instance=instance,
        message_id=message.message_id,
        chat_jid=message.chat_jid,
        sender_jid=message.sender_jid,
        phone=message.phone,
        push_name=message.push_name[:256],
        message_type=message.message_type,
        text=message.text,
        content=message.to_content(),
        payload=parsing.strip_secrets(body),
        evolution_instance=message.evolution_instance[:128],
        status=Status.IGNORED if reason else Status.QUEUED,
        ignore_reason=(reason or "")[:64],
        next_attempt_at=None if reason else now,
        queued_at=None if reason else now,
        finished_at=now if reason else None,
        message_timestamp=_timestamp(message.timestamp),
        received_at=now,
    )
    if instance.is_legacy and not reason:
        # The single-tenant service replied through the server that delivered
        # (the pinned one: legacy_reply_refusal checked it).
        row.reply_server_url = instance.legacy_server_url
        row.reply_api_key = _string(body.get("apikey"))[:512]
    return row


def record_connection_state(*, instance: InstanceConfig, body: dict[str, Any]) -> Result:
    try:
        state, reason = parsing.parse_connection_update(body)
    except parsing.ParseError as exc:
        return Result(Outcome.IGNORED, f"not a usable connection.update: {exc}")
    # One row per instance, updated in place: Evolution sends this event about
    # twice a second while it cannot reach WhatsApp.
    fields: dict[str, Any] = {"state": state[:32], "status_reason": reason}
    wuid = parsing.connection_wuid(body)
    if wuid:
        fields["wuid"] = wuid
    updated = ConnectionState.objects.filter(instance=instance).update(
        updated_at=timezone.now(), **fields
    )
    if not updated:
        try:
            with transaction.atomic():
                ConnectionState.objects.create(instance=instance, **fields)
        except IntegrityError:
            ConnectionState.objects.filter(instance=instance).update(
                updated_at=timezone.now(), **fields
            )
    if state == "open":
        # Replies held while the number was not connected go out now.
        transitions.connected_again(instance_id=instance.pk)
        outbox.connected_again(instance_id=instance.pk)
    return Result(Outcome.IGNORED, f"connection state {state} recorded")


def record_message_updates(*, instance: InstanceConfig, body: dict[str, Any]) -> Result:
    """Delivery and read receipts of the hub's messages (webhooks/outbox.py)."""
    updates = parsing.parse_message_updates(body)
    moved = outbox.record_status_updates(instance_id=instance.pk, updates=updates)
    return Result(Outcome.IGNORED, f"{moved} of {len(updates)} message updates recorded")


def _timestamp(value: int | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""
