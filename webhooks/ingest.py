"""Recording a webhook delivery: find the tenant, check the token, store the row.

This runs inside the webhook request and must stay fast: no outbound call,
one read and one write. The worker does everything else.
"""

import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from instances.models import InstanceConfig
from instances.validators import EVENT_SLUGS
from omnihub.logging import kv
from webhooks import parsing, rows
from webhooks.models import ConnectionState, InboundMessage, Status
from webhooks.notify import notify_new_message
from webhooks.worker import lease_for, new_claim_token

logger = logging.getLogger(__name__)

# Where a delivery carries its instance's token (Evolution v2 custom headers);
# v1.8 can only put it in the URL, as ?token=.
TOKEN_HEADER = "X-Webhook-Token"


class Outcome(StrEnum):
    QUEUED = "queued"
    IGNORED = "ignored"
    DUPLICATE = "duplicate"
    UNKNOWN_INSTANCE = "unknown_instance"
    BAD_TOKEN = "bad_token"
    BAD_BODY = "bad_body"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    detail: str = ""
    message_id: str = ""
    instance_name: str = ""
    # The stored row when it was claimed for this process's worker on insert.
    claimed: InboundMessage | None = None


def find_instance(*, segment: str | None, event: str | None) -> InstanceConfig | None:
    """Which active tenant a webhook path names.

    `/webhook/evolution` and `/webhook/evolution/<event-slug>` are the default
    instance (no instance may be named like an event); `/webhook/evolution/<name>`
    and `/webhook/evolution/<name>/<event-slug>` are that instance.
    """
    if segment is not None and segment.lower() in EVENT_SLUGS and event is None:
        segment = None
    elif event is not None and event.lower() not in EVENT_SLUGS:
        return None
    return rows.find_active_instance(name=segment)


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


def read_delivery(raw: bytes) -> Delivery:
    try:
        body = parsing.make_storable(json.loads(raw, parse_constant=_reject_constant))
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
    try:
        message = parsing.parse_message(body)
    except parsing.ParseError as exc:
        return Delivery(body=body, event=event, problem=f"not a usable message: {exc}")
    reason = parsing.ignore_reason(
        message, now=timezone.now().timestamp(), max_age_seconds=settings.MESSAGE_MAX_AGE
    )
    return Delivery(body=body, event=event, message=message, ignore_reason=reason)


def accept_delivery(
    *,
    segment: str | None,
    event: str | None,
    token: str | None,
    delivery: Delivery,
    claim: bool = False,
) -> Result:
    instance = find_instance(segment=segment, event=event)
    if instance is None:
        return Result(Outcome.UNKNOWN_INSTANCE, "Unknown or inactive instance.")
    if not token_is_valid(instance=instance, given=token):
        return Result(Outcome.BAD_TOKEN, "Missing or wrong webhook token.", "", instance.name)
    if delivery.body is None:
        return Result(Outcome.BAD_BODY, "The body must be a JSON object.", "", instance.name)
    result = record(instance=instance, delivery=delivery, claim=claim)
    return replace(result, instance_name=instance.name)


def record_delivery(*, instance: InstanceConfig, body: dict[str, Any]) -> Result:
    """Record a body for a known instance (what a delivery does after its checks)."""
    return record(instance=instance, delivery=understand(body))


def record(*, instance: InstanceConfig, delivery: Delivery, claim: bool = False) -> Result:
    assert delivery.body is not None
    if delivery.event == "connection.update":
        return record_connection_state(instance=instance, body=delivery.body)
    if delivery.event != "messages.upsert":
        return Result(Outcome.IGNORED, f"event {delivery.event or '(none)'} is not handled")
    if delivery.message is None:
        return Result(Outcome.IGNORED, delivery.problem)
    return record_message(instance=instance, delivery=delivery, claim=claim)


def can_claim_on_insert() -> bool:
    """Whether a new row may be claimed in the transaction that stores it.

    On SQLite every write transaction runs alone, so "no other open message in
    this chat" stays true until commit. On PostgreSQL two servers could store
    two messages of one chat at once, each unseen by the other's check: there
    the worker claims rows only after they are committed.
    """
    return connection.vendor == "sqlite"


def record_message(*, instance: InstanceConfig, delivery: Delivery, claim: bool = False) -> Result:
    """Store a message; with `claim`, hand it straight to this process's worker
    when its chat has nothing else open (saves the worker a claim round trip)."""
    message = delivery.message
    body = delivery.body
    assert message is not None and body is not None
    reason = delivery.ignore_reason
    now = timezone.now()
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
        ignore_reason=reason or "",
        next_attempt_at=None if reason else now,
        finished_at=now if reason else None,
        message_timestamp=_timestamp(message.timestamp),
        received_at=now,
    )
    if instance.is_legacy and not reason:
        # The single-tenant service replied through the server that delivered.
        row.reply_server_url = _string(body.get("server_url"))[:500]
        row.reply_api_key = _string(body.get("apikey"))[:512]
    claimed = (
        claim
        and not reason
        and can_claim_on_insert()
        and not rows.chat_has_open_message(instance_id=instance.pk, chat_jid=message.chat_jid)
    )
    if claimed:
        row.status = Status.PROCESSING
        row.claim_token = new_claim_token()
        row.lease_until = lease_for(agent_timeout=instance.agent_timeout, now=now)
        row.attempts = 1
    if not rows.insert_message(row=row):
        return Result(Outcome.DUPLICATE, "already received", message.message_id, instance.name)
    if not reason and not claimed:
        notify_new_message()
    logger.info(
        "message %s",
        kv(instance=instance.name, id=message.message_id, status=row.status, reason=reason or None),
    )
    outcome = Outcome.IGNORED if reason else Outcome.QUEUED
    return Result(
        outcome, reason or "", message.message_id, instance.name, row if claimed else None
    )


def record_connection_state(*, instance: InstanceConfig, body: dict[str, Any]) -> Result:
    try:
        state, reason = parsing.parse_connection_update(body)
    except parsing.ParseError as exc:
        return Result(Outcome.IGNORED, f"not a usable connection.update: {exc}")
    # One row per instance, updated in place: Evolution sends this event about
    # twice a second while it cannot reach WhatsApp.
    updated = ConnectionState.objects.filter(instance=instance).update(
        state=state[:32], status_reason=reason, updated_at=timezone.now()
    )
    if not updated:
        try:
            with transaction.atomic():
                ConnectionState.objects.create(
                    instance=instance, state=state[:32], status_reason=reason
                )
        except IntegrityError:
            ConnectionState.objects.filter(instance=instance).update(
                state=state[:32], status_reason=reason, updated_at=timezone.now()
            )
    return Result(Outcome.IGNORED, f"connection state {state} recorded")


def _timestamp(value: int | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""
