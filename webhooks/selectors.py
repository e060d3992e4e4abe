"""Reads of conversations for the admin, the API and the CLI (no state changes here)."""

from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet
from django.utils import timezone

from instances.clients.agents import session_name
from webhooks.models import Conversation, InboundMessage

CHAT_PAGE_SIZE = 200


def paused_now_q(now: datetime) -> Q:
    return ~Q(pause_reason="") & (Q(paused_until__isnull=True) | Q(paused_until__gt=now))


def filter_conversations(
    queryset: QuerySet[Conversation], params: dict[str, Any]
) -> QuerySet[Conversation]:
    if params.get("instance"):
        queryset = queryset.filter(instance__name=params["instance"])
    if params.get("phone"):
        queryset = queryset.filter(phone=params["phone"])
    if params.get("state") == "paused":
        queryset = queryset.filter(paused_now_q(timezone.now()))
    elif params.get("state") == "active":
        queryset = queryset.exclude(paused_now_q(timezone.now()))
    return queryset


def chat_messages(
    *, conversation: Conversation, limit: int = CHAT_PAGE_SIZE, with_content: bool = False
) -> list[InboundMessage]:
    """The chat's latest messages, oldest first (the conversation page and API).

    `with_content` loads the normalized message too (a few hundred bytes: the
    media's description, never its bytes), for the page's media lines."""
    deferred = ["payload", "agent_request", "agent_response", "reply_api_key"]
    if not with_content:
        deferred.append("content")
    latest = (
        InboundMessage.objects.filter(
            instance_id=conversation.instance_id, chat_jid=conversation.chat_jid
        )
        .defer(*deferred)
        .order_by("-id")[:limit]
    )
    return list(reversed(latest))


def current_session(*, conversation: Conversation) -> str:
    """The agent session the chat's next message goes to: its bound agent's
    (routing), else the instance's own agent's."""
    agent = conversation.bound_agent
    return session_name(
        instance=conversation.instance,
        phone=conversation.phone,
        chat_jid=conversation.chat_jid,
        epoch=conversation.session_epoch,
        agent=agent.session_suffix if agent is not None else "",
    )
