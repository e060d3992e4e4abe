from datetime import datetime
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from instances.validators import DEFAULT_AGENT_NAME
from webhooks.models import Conversation, InboundMessage, PauseReason, Status
from webhooks.selectors import CHAT_PAGE_SIZE, chat_messages, current_session


def milliseconds(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds() * 1000)


class MessageSerializer(serializers.ModelSerializer):
    """A message of the log. Never the legacy reply key or the worker's claim token."""

    instance = serializers.SlugRelatedField(
        slug_field="name", read_only=True, help_text="The instance's name."
    )
    agent_ms = serializers.SerializerMethodField(
        help_text="Milliseconds the agent took (agent_finished_at - agent_started_at)."
    )
    total_ms = serializers.SerializerMethodField(
        help_text="Milliseconds from receipt to the end (finished_at, else sent_at)."
    )

    class Meta:
        model = InboundMessage
        fields = [
            "id",
            "instance",
            "message_id",
            "chat_jid",
            "sender_jid",
            "phone",
            "push_name",
            "message_type",
            "text",
            "status",
            "ignore_reason",
            "attempts",
            "agent_attempts",
            "send_attempts",
            "next_attempt_at",
            "last_error",
            "reply_text",
            "transcript",
            "used_fallback",
            "message_timestamp",
            "received_at",
            "agent_started_at",
            "agent_finished_at",
            "sent_at",
            "finished_at",
            "agent_ms",
            "total_ms",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "reply_text": {
                "help_text": "The agent's answer: null while it has not answered, "
                "empty when there was nothing to send."
            },
            "transcript": {
                "help_text": "A voice note's text as its agent got it (Evolution's "
                "speechToText or the instance's speech-to-text); empty for other messages."
            },
        }

    def get_agent_ms(self, obj: InboundMessage) -> int | None:
        return milliseconds(obj.agent_started_at, obj.agent_finished_at)

    def get_total_ms(self, obj: InboundMessage) -> int | None:
        return milliseconds(obj.received_at, obj.finished_at or obj.sent_at)


class MessageDetailSerializer(MessageSerializer):
    class Meta(MessageSerializer.Meta):
        fields = [
            *MessageSerializer.Meta.fields,
            "content",
            "agent_request",
            "agent_response",
            "payload",
        ]
        read_only_fields = fields


class MessageFilterSerializer(serializers.Serializer):
    """The list's query parameters."""

    instance = serializers.CharField(required=False, help_text="The instance's name.")
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    received_after = serializers.DateTimeField(
        required=False, help_text="ISO 8601 date-time; messages received at or after it."
    )
    received_before = serializers.DateTimeField(
        required=False, help_text="ISO 8601 date-time; messages received before it."
    )
    search = serializers.CharField(
        required=False,
        help_text="Part of the phone number, push name or text, or the exact message id.",
    )


class ConversationSerializer(serializers.ModelSerializer):
    """A chat of an instance and the bot's state in it."""

    instance = serializers.SlugRelatedField(
        slug_field="name", read_only=True, help_text="The instance's name."
    )
    name = serializers.CharField(
        source="push_name", read_only=True, help_text="The user's WhatsApp name."
    )
    state = serializers.ChoiceField(
        choices=["active", "paused"], read_only=True, help_text="Whether the bot answers now."
    )
    session_name = serializers.SerializerMethodField(
        help_text="The agent session the chat's next message goes to."
    )
    agent = serializers.SerializerMethodField(
        help_text="The agent the chat is bound to by a routing rule (until a reset or an "
        "idle expiry): an agent's name, or 'default', the instance's own agent."
    )
    pause_reason = serializers.ChoiceField(
        choices=["", *PauseReason.values],
        read_only=True,
        help_text="Why the bot is paused (human takeover, bot off, paused by an operator); "
        "empty when it is not. A pause whose time is over keeps its reason.",
    )

    class Meta:
        model = Conversation
        fields = [
            "id",
            "instance",
            "chat_jid",
            "phone",
            "name",
            "is_group",
            "state",
            "paused_until",
            "pause_reason",
            "agent",
            "session_name",
            "session_epoch",
            "last_message_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "paused_until": {"help_text": "With a pause: until when; null is until resumed."},
        }

    def get_session_name(self, obj: Conversation) -> str:
        return current_session(conversation=obj)

    def get_agent(self, obj: Conversation) -> str:
        return obj.bound_agent.name if obj.bound_agent is not None else DEFAULT_AGENT_NAME


class ChatMessageSerializer(serializers.ModelSerializer):
    """A user's message in a conversation, with the reply sent for it."""

    class Meta:
        model = InboundMessage
        fields = [
            "id",
            "message_id",
            "push_name",
            "text",
            "status",
            "ignore_reason",
            "received_at",
            "transcript",
            "reply_text",
            "sent_at",
            "finished_at",
            "answered_by",
            "session_name",
            "last_error",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "answered_by": {
                "help_text": "A message folded into a burst: the message whose agent call "
                "answered it."
            }
        }


class ConversationDetailSerializer(ConversationSerializer):
    messages = serializers.SerializerMethodField(
        help_text=f"The chat's latest {CHAT_PAGE_SIZE} messages, oldest first."
    )

    class Meta(ConversationSerializer.Meta):
        fields = [*ConversationSerializer.Meta.fields, "messages"]
        read_only_fields = fields

    @extend_schema_field(ChatMessageSerializer(many=True))
    def get_messages(self, obj: Conversation) -> list[dict[str, Any]]:
        return ChatMessageSerializer(chat_messages(conversation=obj), many=True).data


class ConversationFilterSerializer(serializers.Serializer):
    instance = serializers.CharField(required=False, help_text="The instance's name.")
    phone = serializers.CharField(required=False, help_text="The phone number's digits.")
    state = serializers.ChoiceField(choices=["active", "paused"], required=False)


class PauseSerializer(serializers.Serializer):
    minutes = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=60 * 24 * 365,
        help_text="How long to pause; omitted or null: until resumed.",
    )
