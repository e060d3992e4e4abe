"""Validation rules for tenant fields, shared by the model, admin, API and CLI."""

import re
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Evolution's "webhook by events" appends one of these to the webhook URL.
# `/webhook/evolution/<segment>` means "the default instance, event <segment>"
# when the segment is one of them, so no instance may take such a name.
EVENT_SLUGS = frozenset(
    {
        "application-startup",
        "call",
        "chats-delete",
        "chats-set",
        "chats-update",
        "chats-upsert",
        "connection-update",
        "contacts-set",
        "contacts-update",
        "contacts-upsert",
        "errors",
        "group-participants-update",
        "groups-update",
        "groups-upsert",
        "instance-create",
        "instance-delete",
        "labels-association",
        "labels-edit",
        "logout-instance",
        "messages-delete",
        "messages-edited",
        "messages-set",
        "messages-update",
        "messages-upsert",
        "presence-update",
        "qrcode-updated",
        "remove-instance",
        "send-message",
        "typebot-change-status",
        "typebot-start",
    }
)


def validate_instance_name(value: str) -> None:
    if not NAME_RE.fullmatch(value or ""):
        raise ValidationError(
            "Use 1 to 64 characters: letters, digits, '_' or '-'.", code="invalid_name"
        )
    if value.lower() in EVENT_SLUGS:
        raise ValidationError(
            f"'{value}' is an Evolution event name, reserved for the default "
            "instance's /webhook/evolution/<event> route.",
            code="reserved_name",
        )


def validate_http_url(value: str) -> None:
    """Accept only absolute http(s) URLs with a host."""
    if not value:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValidationError(f"Not a valid URL: {exc}.", code="invalid_url") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(
            "Enter an http:// or https:// URL with a host, e.g. https://evolution.example.com.",
            code="invalid_url",
        )
    if parts.username is not None or parts.password is not None:
        # The URL is shown in the admin, the API and error messages: keys go
        # in their own (secret) fields, never in a URL.
        raise ValidationError(
            "Put no user name or password in the URL; use the key field.",
            code="invalid_url",
        )
    if any(ch.isspace() for ch in value):
        raise ValidationError("A URL cannot contain spaces.", code="invalid_url")


def validate_secret(value: str) -> None:
    """Secrets travel in HTTP headers: printable ASCII, no spaces."""
    if value and not re.fullmatch(r"[\x21-\x7e]{1,512}", value):
        raise ValidationError(
            "Use printable ASCII characters without spaces (at most 512).",
            code="invalid_secret",
        )


DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(value: str) -> str | None:
    """scheme://host:port of a URL, with the default port made explicit; None if unreadable."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"
