from datetime import datetime

from rest_framework import serializers

from webhooks.models import InboundMessage, Status


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
