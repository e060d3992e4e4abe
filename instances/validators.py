"""Validation rules for tenant fields, shared by the model, admin, API and CLI."""

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Every event name Evolution has emitted (the `Events` enum of
# src/api/types/wa.types.ts and EventController.events, v1.8 to 2.4), as it
# names them in webhook bodies. "Webhook by events" appends the slug of the
# event to the webhook URL (webhook.controller.ts: "." and "-" become "_",
# upper-cased, then "_" becomes "-", lower-cased): `send.message.update` ->
# `/send-message-update`.
EVOLUTION_EVENTS = (
    "application.startup",
    "call",
    "chama-ai.action",
    "chats.delete",
    "chats.set",
    "chats.update",
    "chats.upsert",
    "connection.update",
    "contacts.set",
    "contacts.update",
    "contacts.upsert",
    "creds.update",
    "errors",
    "group-participants.update",
    "group.participants.update",
    "group.update",
    "groups.update",
    "groups.upsert",
    "instance.create",
    "instance.delete",
    "labels.association",
    "labels.edit",
    "logout.instance",
    "messages.delete",
    "messages.edited",
    "messages.set",
    "messages.update",
    "messages.upsert",
    "messaging-history.set",
    "new.jwt",
    "new.jwt.token",
    "presence.update",
    "qrcode.updated",
    "remove.instance",
    "send.message",
    "send.message.update",
    "status.instance",
    "typebot.change-status",
    "typebot.change.status",
    "typebot.start",
)


def event_slug(event: str) -> str:
    """The URL suffix Evolution's "webhook by events" gives this event."""
    return re.sub(r"[._-]", "-", event).lower()


# `/webhook/evolution/<segment>` means "the default instance, event <segment>"
# when the segment is one of these, so no instance may take such a name.
EVENT_SLUGS = frozenset(event_slug(event) for event in EVOLUTION_EVENTS)

# What an event suffix looks like. A well-formed suffix that is not in
# EVENT_SLUGS is an event newer than this list: it is answered 200 like any
# event, never 404, which Evolution would take as "drop it for good".
EVENT_SLUG_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*", re.IGNORECASE)
MAX_EVENT_SLUG_LENGTH = 64


def is_event_slug(value: str) -> bool:
    return len(value) <= MAX_EVENT_SLUG_LENGTH and EVENT_SLUG_RE.fullmatch(value) is not None


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
    refusal = host_refusal(parts.hostname, allow_private=settings.OUTBOUND_ALLOW_PRIVATE)
    if refusal is not None:
        raise ValidationError(refusal, code="forbidden_address")


# --- where the hub may send requests (server-side request forgery) -------------
# A tenant's URL is called by the hub's own server: pointed at a cloud metadata
# service it would fetch the machine's credentials and show the answer in an
# error. These are refused always; instances/clients/aiohttp_transport.py applies the same
# rules to the addresses a host name resolves to, at connect time.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (older)
        "168.63.129.16",  # Azure WireServer
    )
)
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
# Refused when OUTBOUND_ALLOW_PRIVATE is false (with loopback, unspecified and
# the addresses ipaddress calls private): CGNAT, which is_private leaves out.
CGNAT = ipaddress.ip_network("100.64.0.0/10")
ALLOW_PRIVATE_HINT = "refused while OUTBOUND_ALLOW_PRIVATE is false"


def address_refusal(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why the hub must not connect to this address; None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address: the hub never calls it."
    if any(address in network for network in LINK_LOCAL):
        return f"{address} is a link-local address: the hub never calls one."
    if allow_private:
        return None
    for kind, applies in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a CGNAT", isinstance(address, ipaddress.IPv4Address) and address in CGNAT),
        ("a private", address.is_private),
    ):
        if applies:
            return f"{address} is {kind} address, {ALLOW_PRIVATE_HINT}."
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host spells, in any form the system resolver reads."""
    host = host.strip("[]").split("%", 1)[0]  # IPv6 brackets and zone (fe80::1%eth0)
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # 2852039166, 0xa9fea9fe, 169.254.43518: inet_aton reads them as addresses.
    if re.fullmatch(r"[0-9a-fx.]+", host, re.IGNORECASE) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def host_refusal(host: str, *, allow_private: bool) -> str | None:
    """Why a URL's host must not be called; None when nothing about its name forbids it.

    No DNS here: a name is checked by what it resolves to when the hub connects.
    """
    name = host.lower().rstrip(".")
    if name in METADATA_HOSTS:
        return f"{host} is a cloud metadata service: the hub never calls it."
    address = literal_address(name)
    if address is not None:
        return address_refusal(address, allow_private=allow_private)
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        return f"{host} is a loopback address, {ALLOW_PRIVATE_HINT}."
    return None


# The mark of an encrypted stored value (instances/crypto.py); kept here so the
# validators need nothing of the encryption itself.
ENCRYPTED_PREFIX = "enc1:"


def validate_secret(value: str) -> None:
    """Secrets travel in HTTP headers: printable ASCII, no spaces."""
    if value and not re.fullmatch(r"[\x21-\x7e]{1,512}", value):
        raise ValidationError(
            "Use printable ASCII characters without spaces (at most 512).",
            code="invalid_secret",
        )
    if value.startswith(ENCRYPTED_PREFIX):
        # Stored in plain text (no key set), it would later read as encrypted.
        raise ValidationError(
            f"A secret cannot start with '{ENCRYPTED_PREFIX}': that marks an encrypted "
            "stored value.",
            code="invalid_secret",
        )


# A phone number (digits, `*` at the end as a prefix wildcard) or a group JID.
CHAT_PATTERN_RE = re.compile(r"^(?:[0-9]{1,20}\*?|\*|[0-9]{1,30}(?:-[0-9]{1,20})?@g\.us)$")
# The bot's own ids for mention matching: its phone digits, or a JID (…@lid, …@s.whatsapp.net).
BOT_ID_RE = re.compile(r"^(?:[0-9]{1,20}|[0-9]{1,30}@(?:lid|s\.whatsapp\.net))$")


def _string_list(value: object, *, pattern: re.Pattern[str], example: str) -> None:
    if not isinstance(value, list):
        raise ValidationError(f"Enter a list, e.g. {example}.", code="not_a_list")
    for item in value:
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise ValidationError(
                f"{item!r} is not valid here; examples: {example}.", code="invalid_item"
            )


def validate_chat_patterns(value: object) -> None:
    """allow_list / block_list entries."""
    _string_list(
        value,
        pattern=CHAT_PATTERN_RE,
        example='["5511987654321", "5511*", "120363041234567890@g.us"]',
    )


def validate_chat_pattern(value: str) -> None:
    """One chat pattern (a `chat` routing rule's value): the same entries as the lists."""
    if not CHAT_PATTERN_RE.fullmatch(value or ""):
        raise ValidationError(
            f"{value!r} is not a chat; examples: 5511987654321, 5511*, 120363041234567890@g.us.",
            code="invalid_chat",
        )


# An agent's name: the same characters as an instance's, starting with a letter
# (it ends the agent's session names, after the session's number). "default" is
# the instance's own agent in a routing rule.
AGENT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
DEFAULT_AGENT_NAME = "default"


def validate_agent_name(value: str) -> None:
    if not AGENT_NAME_RE.fullmatch(value or ""):
        raise ValidationError(
            "Use 1 to 64 characters: letters, digits, '_' or '-', starting with a letter.",
            code="invalid_name",
        )
    if value.lower() == DEFAULT_AGENT_NAME:
        raise ValidationError(
            "'default' is the instance's own agent (its agent fields): choose another name.",
            code="reserved_name",
        )


MAX_KEYWORD_LENGTH = 64
MAX_KEYWORDS = 50


def validate_keywords(value: object) -> None:
    """A list of keywords (opt_out_keywords): non-blank strings of at most 64 characters."""
    if not isinstance(value, list):
        raise ValidationError('Enter a list, e.g. ["STOP", "SAIR"].', code="not_a_list")
    if len(value) > MAX_KEYWORDS:
        raise ValidationError(f"At most {MAX_KEYWORDS} keywords.", code="too_many")
    for item in value:
        if (
            not isinstance(item, str)
            or not item.strip()
            or len(item) > MAX_KEYWORD_LENGTH
            or "\x00" in item
        ):
            raise ValidationError(
                f"{item!r} is not a keyword: enter text of 1 to {MAX_KEYWORD_LENGTH} characters.",
                code="invalid_item",
            )


def validate_bot_ids(value: object) -> None:
    _string_list(value, pattern=BOT_ID_RE, example='["5511900000001", "123456789012345@lid"]')


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
