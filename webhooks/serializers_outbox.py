"""The send API's request and answer: POST/GET /api/v1/instances/{name}/messages/."""

import base64
import binascii
import re
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from webhooks.models import OutboundKind, OutboundMessage, OutboundStatus

# A phone number (digits, an optional +, spaces, dashes, dots and brackets are
# dropped) or a WhatsApp JID as Evolution names chats.
JID_RE = re.compile(r"^[0-9]{5,20}(-[0-9]{1,20})?@(s\.whatsapp\.net|g\.us|lid)$")
NUMBER_RE = re.compile(r"^\+?[0-9 ()./-]{5,30}$")
MAX_TEXT = 65536
# Base64 media up to 16 MB (WhatsApp's limit for most media).
MAX_BASE64 = 16 * 1024 * 1024 * 4 // 3 + 4
MEDIATYPES = ("image", "video", "audio", "document")


def chat_jid_of(value: str) -> str:
    """`to` as the chat's JID: digits become <digits>@s.whatsapp.net."""
    value = value.strip()
    if "@" in value:
        if not JID_RE.match(value):
            raise serializers.ValidationError(
                "Not a WhatsApp JID (<digits>@s.whatsapp.net, <id>@g.us or <id>@lid)."
            )
        return value
    if not NUMBER_RE.match(value):
        raise serializers.ValidationError("A phone number with its country code, or a JID.")
    digits = re.sub(r"[^0-9]", "", value)
    if not 8 <= len(digits) <= 15:
        raise serializers.ValidationError(
            "A phone number has 8 to 15 digits with its country code."
        )
    return f"{digits}@s.whatsapp.net"


def mediatype_of(mime_type: str) -> str:
    head = mime_type.split("/", 1)[0]
    return head if head in ("image", "video", "audio") else "document"


class MediaSerializer(serializers.Serializer):
    url = serializers.URLField(
        required=False, max_length=2000, help_text="A URL Evolution downloads."
    )
    base64 = serializers.CharField(
        required=False, max_length=MAX_BASE64, trim_whitespace=True, help_text="The file itself."
    )
    mime_type = serializers.RegexField(r"^[a-z]+/[A-Za-z0-9.+-]+$", max_length=128)
    file_name = serializers.CharField(required=False, max_length=255, default="", allow_blank=True)
    caption = serializers.CharField(required=False, max_length=4096, default="", allow_blank=True)

    def validate_base64(self, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise serializers.ValidationError("Not valid base64.") from exc
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs.get("url")) == bool(attrs.get("base64")):
            raise serializers.ValidationError("Give one of url and base64.")
        attrs["mediatype"] = mediatype_of(attrs["mime_type"])
        return attrs


class SendRequestSerializer(serializers.Serializer):
    to = serializers.CharField(
        max_length=128, help_text="A phone number with its country code, or a chat's JID."
    )
    text = serializers.CharField(required=False, max_length=MAX_TEXT, trim_whitespace=False)
    media = MediaSerializer(required=False)
    idempotency_key = serializers.CharField(
        required=False,
        max_length=128,
        help_text="The same key for the same instance is the same send (also the "
        "Idempotency-Key header): answered again, never sent twice.",
    )
    send_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="Not sent before this time (ISO 8601)."
    )

    def validate_to(self, value: str) -> str:
        return chat_jid_of(value)

    def validate_text(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("The text is empty.")
        if "\x00" in value:
            raise serializers.ValidationError("Null characters are not allowed.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("text" in attrs) == ("media" in attrs):
            raise serializers.ValidationError("Give one of text and media.")
        return attrs


class OutboundMediaSerializer(serializers.Serializer):
    url = serializers.CharField(required=False)
    base64_bytes = serializers.IntegerField(
        required=False, help_text="The length of the base64 given (the file is not returned)."
    )
    mime_type = serializers.CharField()
    file_name = serializers.CharField()
    caption = serializers.CharField()
    mediatype = serializers.CharField()


class OutboundMessageSerializer(serializers.ModelSerializer):
    to = serializers.CharField(source="chat_jid")
    media = serializers.SerializerMethodField()
    key_id = serializers.CharField(
        source="evolution_id", help_text="Evolution's key.id once sent ('' before)."
    )
    status = serializers.ChoiceField(choices=OutboundStatus.choices)
    kind = serializers.ChoiceField(choices=OutboundKind.choices)

    class Meta:
        model = OutboundMessage
        fields = [
            "id",
            "kind",
            "to",
            "text",
            "media",
            "status",
            "key_id",
            "error",
            "wait_reason",
            "idempotency_key",
            "send_at",
            "attempts",
            "created_at",
            "sent_at",
            "delivered_at",
            "read_at",
        ]
        read_only_fields = fields

    @extend_schema_field(OutboundMediaSerializer(allow_null=True))
    def get_media(self, row: OutboundMessage) -> dict[str, Any] | None:
        if not row.media:
            return None
        shown = {k: v for k, v in row.media.items() if k != "base64"}
        if "base64" in row.media:
            shown["base64_bytes"] = len(row.media["base64"])
        return shown


class OutboundFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=OutboundStatus.choices, required=False)
    kind = serializers.ChoiceField(choices=OutboundKind.choices, required=False)
    to = serializers.CharField(required=False, max_length=128, help_text="A number or a JID.")
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def validate_to(self, value: str) -> str:
        return chat_jid_of(value)
