import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import (
    MaxValueValidator,
    MinValueValidator,
    ProhibitNullCharactersValidator,
)
from django.db import models
from django.db.models import signals
from django.db.models.base import ModelState
from django.utils import timezone

from instances.fields import EncryptedCharField
from instances.validators import (
    DEFAULT_AGENT_NAME,
    url_origin,
    validate_agent_name,
    validate_bot_ids,
    validate_chat_pattern,
    validate_chat_patterns,
    validate_http_url,
    validate_instance_name,
    validate_keywords,
    validate_secret,
)

DEFAULT_FALLBACK_MESSAGE = (
    "Sorry, we could not answer your message right now. Please try again in a few minutes."
)
MAX_AGENT_TIMEOUT = 600
NO_NUL = ProhibitNullCharactersValidator()
SECRET_FIELDS = ("evolution_key", "agent_api_key", "webhook_token", "stt_key", "callback_secret")
DEFAULT_RESET_REPLY = "Conversation restarted."
DEFAULT_OPT_OUT_KEYWORDS = ("STOP", "SAIR", "PARAR", "CANCELAR")
DEFAULT_OPT_OUT_REPLY = (
    "Done: you will get no more messages from us. Write to us any time if you need help."
)


def default_opt_out_keywords() -> list[str]:
    return list(DEFAULT_OPT_OUT_KEYWORDS)
DEFAULT_STT_FAILURE_MESSAGE = "Sorry, I could not understand this voice note. Could you write it?"
MAX_DEBOUNCE_SECONDS = 300
MAX_HANDOFF_MINUTES = 7 * 24 * 60
# The per-instance conversation settings, in the order the admin, the API and
# the CLI show them.
CONVERSATION_FIELDS = (
    "handoff_minutes",
    "bot_off_keyword",
    "bot_on_keyword",
    "debounce_seconds",
    "group_policy",
    "bot_ids",
    "allow_list",
    "block_list",
    "reset_keyword",
    "reset_reply",
    "session_idle_minutes",
    "max_concurrent",
    "opt_out_keywords",
    "opt_out_reply",
)
# Which agent answers and how (instances/clients/agents/), in the same order everywhere.
AGENT_KIND_FIELDS = ("agent_kind", "system_prompt", "history_limit")
# How a reply is sent (webhooks/reply_parts.py), in the same order everywhere.
REPLY_FIELDS = ("split_replies", "typing_ms_per_char", "send_media_links", "quote_replies")
MAX_TYPING_MS_PER_CHAR = 1000
# How media and voice notes reach the agent (webhooks/media_input.py).
MEDIA_FIELDS = (
    "media_max_bytes",
    "stt_url",
    "stt_key",
    "stt_model",
    "stt_failure_message",
    "mark_read",
)
# Where the status of the messages the hub sends is posted (webhooks/callbacks.py).
CALLBACK_FIELDS = ("callback_url", "callback_secret")
# How the outbox paces API and operator sends (webhooks/outbox.py), in the same
# order everywhere.
OUTBOUND_FIELDS = ("send_interval_ms", "daily_send_limit", "warmup_days", "send_backoff_minutes")
MAX_SEND_INTERVAL_MS = 10 * 60 * 1000
MAX_DAILY_SEND_LIMIT = 1_000_000
MAX_WARMUP_DAYS = 365
# The pause after a rate limit doubles from send_backoff_minutes up to this.
MAX_SEND_BACKOFF_MINUTES = 60
DEFAULT_MEDIA_MAX_BYTES = 10 * 1024 * 1024
MAX_MEDIA_BYTES = 50 * 1024 * 1024
# An agent of its own under an instance (Agent) has these, as the instance has for
# its default agent: the same fields, the same rules.
AGENT_FIELDS = (
    "agent_kind",
    "agent_api_url",
    "agent_api_key",
    "default_agent",
    "system_prompt",
    "agent_timeout",
    "history_limit",
)
MAX_HISTORY_LIMIT = 200


class AgentKind(models.TextChoices):
    AUTOMAGIK = "automagik", "Automagik Agent API (POST …/api/v1/agent/{agent}/run)"
    OPENAI = "openai", "OpenAI-compatible (POST {base}/chat/completions)"
    WEBHOOK = "webhook", "Webhook: n8n, Make, Flowise, any endpoint (POST {url})"


# The kinds that send a bearer token only when one is set (a local Ollama, an
# open n8n webhook); the Agent API always wants its key.
KINDS_WITHOUT_KEY = frozenset({AgentKind.OPENAI, AgentKind.WEBHOOK})
AGENT_KEY_REQUIRED = (
    "Required for the automagik kind (sent as x-api-key); only openai and webhook "
    "agents may have none."
)


class GroupPolicy(models.TextChoices):
    IGNORE = "ignore", "Ignore group messages"
    MENTIONS = "mentions", "Answer when mentioned or quoted"
    ALL = "all", "Answer every group message"


def normalized_url(url: str) -> str:
    """A URL as a server: scheme and host lower-cased, no trailing slash."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        # An invalid URL (its field says why) is compared as it is.
        return url
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, "")
    )


# Each URL and the key the hub sends to it.
KEY_OF_URL = {
    "evolution_url": "evolution_key",
    "agent_api_url": "agent_api_key",
    "stt_url": "stt_key",
    # Not sent, but it signs what is sent there: a new host must be given it anew.
    "callback_url": "callback_secret",
}
_TRACKED_SECRETS = frozenset(SECRET_FIELDS)


# Where a delivery carries its instance's token (Evolution v2 custom headers;
# provisioning sets it, the webhook view reads it); v1.8 can only put it in the
# URL, as ?token=.
TOKEN_HEADER = "X-Webhook-Token"


def generate_webhook_token() -> str:
    return secrets.token_urlsafe(32)


class InstanceConfig(models.Model):
    """One tenant: a WhatsApp number on an Evolution API, answered by one agent."""

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[validate_instance_name],
        help_text="The tenant's identifier in URLs: letters, digits, '_' and '-'. "
        "It cannot be changed once created (Evolution posts to a URL holding it).",
    )
    is_active = models.BooleanField(
        default=True,
        help_text="Off: the bot does not answer. Deliveries are still checked and stored "
        "(as ignored, reason 'instance inactive') and answered 200, so none is lost.",
    )
    is_default = models.BooleanField(
        default=False,
        help_text="The default instance answers the legacy route /webhook/evolution.",
    )
    # An explicit property, never derived from is_default: moving the default
    # must not rename any agent session nor leave a tenant unable to reply.
    legacy_mode = models.BooleanField(
        default=False,
        help_text="Behave as the single-tenant service this hub replaced: agent sessions "
        "named SESSION_ID_PREFIX + number (without the instance's name) and, with no "
        "Evolution URL and key, replies through the server deliveries name (pinned below). "
        "Set on the instance seeded from .env; moving the default does not change it.",
    )
    legacy_server_url = models.CharField(
        "Legacy reply server",
        max_length=500,
        blank=True,
        validators=[validate_http_url, NO_NUL],
        help_text="Legacy mode without an Evolution URL: the server_url of the first "
        "delivery, pinned so that no one else can choose where replies go. Deliveries "
        "naming another server are stored as ignored. Clear it to pin the next one's.",
    )

    evolution_url = models.CharField(
        "Evolution API URL",
        max_length=500,
        blank=True,
        validators=[validate_http_url, NO_NUL],
        help_text="e.g. https://evolution.example.com. Blank only in legacy mode (replies "
        "through the legacy reply server).",
    )
    # The three secrets (SECRET_FIELDS) are encrypted at rest: instances/crypto.py.
    evolution_key = EncryptedCharField(
        "Evolution API key", max_length=512, blank=True, validators=[validate_secret]
    )
    whatsapp_instance = models.CharField(
        "WhatsApp instance",
        max_length=128,
        blank=True,
        validators=[NO_NUL],
        help_text="The instance's name inside Evolution. Blank: the same as the name "
        "(in legacy mode without an Evolution URL: the delivery's instance).",
    )
    webhook_token = EncryptedCharField(
        max_length=512,
        blank=True,
        default=generate_webhook_token,
        validators=[validate_secret],
        help_text="Deliveries must carry it as header X-Webhook-Token or ?token=. "
        "Blank accepts unauthenticated deliveries.",
    )

    agent_kind = models.CharField(
        max_length=16,
        choices=AgentKind.choices,
        default=AgentKind.AUTOMAGIK,
        help_text="How the agent is called. automagik: the Agent API (it keeps the memory); "
        "openai: any OpenAI-compatible server (the hub keeps the memory); webhook: a JSON "
        "POST to a workflow (it keeps the memory).",
    )
    agent_api_url = models.CharField(
        "Agent API URL",
        max_length=500,
        validators=[validate_http_url, NO_NUL],
        help_text="automagik: the server's base URL; openai: the API base, e.g. "
        "https://api.openai.com/v1 or http://127.0.0.1:11434/v1; webhook: the URL posted to.",
    )
    agent_api_key = EncryptedCharField(
        "Agent API key",
        max_length=512,
        blank=True,
        validators=[validate_secret],
        help_text="automagik: sent as x-api-key (required); openai and webhook: sent as "
        "'Authorization: Bearer …', blank sends no header.",
    )
    default_agent = models.CharField(
        max_length=128,
        default="simple_agent",
        validators=[NO_NUL],
        help_text="automagik: the agent's name; openai: the model (e.g. gpt-4o-mini, "
        "llama3.2); webhook: unused.",
    )
    system_prompt = models.TextField(
        blank=True,
        validators=[NO_NUL],
        help_text="openai only: sent first, as the system message. Blank sends none.",
    )
    history_limit = models.PositiveIntegerField(
        default=20,
        validators=[MaxValueValidator(MAX_HISTORY_LIMIT)],
        help_text="openai only: how many earlier messages of the chat's session (user and "
        "assistant together, the oldest dropped first) go with each request. A reset or "
        f"an idle expiry starts empty. 0: none. At most {MAX_HISTORY_LIMIT}.",
    )
    agent_timeout = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_AGENT_TIMEOUT)],
        help_text=f"Seconds to wait for the agent's reply (1 to {MAX_AGENT_TIMEOUT}).",
    )
    session_id_prefix = models.CharField(
        max_length=64,
        blank=True,
        validators=[NO_NUL],
        help_text="Prepended to the phone digits to form the agent session name. Blank: "
        "'<name>_', so two tenants never share a session (in legacy mode: nothing, as the "
        "single-tenant service named them).",
    )
    fallback_message = models.TextField(
        default=DEFAULT_FALLBACK_MESSAGE,
        blank=True,
        validators=[NO_NUL],
        help_text="Sent to the user when the agent fails for good. Blank sends nothing.",
    )

    # --- replies: sent like a person's (webhooks/reply_parts.py) ---
    split_replies = models.BooleanField(
        default=False,
        help_text="Send a reply as several WhatsApp messages, split on blank lines, in order.",
    )
    typing_ms_per_char = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(MAX_TYPING_MS_PER_CHAR)],
        help_text='Before each message, WhatsApp shows "typing…" for its length times '
        "this many milliseconds, clamped to 1 to 8 s. 0: off.",
    )
    send_media_links = models.BooleanField(
        default=True,
        help_text="A markdown image or file link, or a bare URL ending in a media "
        "extension (.png, .pdf, .mp3…), is sent as the image, video, audio or document "
        "itself, with its alt or link text as the caption.",
    )
    quote_replies = models.BooleanField(
        default=False,
        help_text="In one-to-one chats too, the reply quotes the message it answers "
        "(in groups it always does).",
    )

    # --- media and voice: what of a photo, a document or a voice note the agent gets ---
    media_max_bytes = models.PositiveIntegerField(
        default=DEFAULT_MEDIA_MAX_BYTES,
        validators=[MaxValueValidator(MAX_MEDIA_BYTES)],
        help_text="Media larger than this (bytes) reach the agent as a description (type, "
        f"size, file name, caption) without the file. At most {MAX_MEDIA_BYTES}; 0: never "
        "the file.",
    )
    stt_url = models.CharField(
        "Speech-to-text URL",
        max_length=500,
        blank=True,
        validators=[validate_http_url, NO_NUL],
        help_text="An OpenAI-compatible base for voice notes (POST {url}/audio/transcriptions), "
        "e.g. https://api.openai.com/v1, https://api.groq.com/openai/v1 or a local "
        "faster-whisper server. Blank: voice notes are not transcribed.",
    )
    stt_key = EncryptedCharField(
        "Speech-to-text key",
        max_length=512,
        blank=True,
        validators=[validate_secret],
        help_text="Sent as 'Authorization: Bearer …'; blank sends no header.",
    )
    stt_model = models.CharField(
        "Speech-to-text model",
        max_length=128,
        default="whisper-1",
        validators=[NO_NUL],
        help_text="e.g. whisper-1 (OpenAI), whisper-large-v3 (Groq), or the local server's model.",
    )
    stt_failure_message = models.TextField(
        default=DEFAULT_STT_FAILURE_MESSAGE,
        blank=True,
        validators=[NO_NUL],
        help_text="Sent when a voice note cannot be transcribed. Blank sends nothing.",
    )
    mark_read = models.BooleanField(
        default=False,
        help_text="Mark a message read (blue ticks) when the agent starts working on it.",
    )

    # --- status callbacks: the outbound messages' statuses, posted signed ---
    callback_url = models.CharField(
        "Status callback URL",
        max_length=500,
        blank=True,
        validators=[validate_http_url, NO_NUL],
        help_text="Each new status of a message the hub sends (sent, delivered, read, failed) "
        "is POSTed here as JSON, signed (header X-Omnihub-Signature), retried with backoff. "
        "Blank: none.",
    )
    callback_secret = EncryptedCharField(
        "Status callback secret",
        max_length=512,
        blank=True,
        validators=[validate_secret],
        help_text="Signs each callback: X-Omnihub-Signature: sha256=<hex HMAC-SHA256 of the "
        "body with this secret>. Blank: callbacks are not signed.",
    )

    # --- outbound: how the outbox paces API and operator sends (webhooks/outbox.py) ---
    send_interval_ms = models.PositiveIntegerField(
        default=1000,
        validators=[MaxValueValidator(MAX_SEND_INTERVAL_MS)],
        help_text="An API or operator send waits at least this long after the instance's "
        "last send of any kind (replies included), plus up to 40 % random jitter. "
        "Replies are never delayed. 0: no pacing.",
    )
    daily_send_limit = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(MAX_DAILY_SEND_LIMIT)],
        help_text="At most this many API sends a day (UTC); one over it waits for the next "
        "day. Replies and operator sends never count. 0: no limit.",
    )
    warmup_days = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(MAX_WARMUP_DAYS)],
        help_text="A new number's warm-up: the daily limit ramps from 10 % to 100 % over this "
        "many days from its first API send. Needs a daily limit. 0: none.",
    )
    send_backoff_minutes = models.PositiveIntegerField(
        default=5,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_SEND_BACKOFF_MINUTES)],
        help_text="When WhatsApp's rate limit is reported (rate-overlimit, or repeated "
        "429/5xx), API and operator sends pause this long, doubling each time up to an hour.",
    )

    # --- conversations: how the bot behaves in a chat ---
    handoff_minutes = models.PositiveIntegerField(
        default=30,
        validators=[MaxValueValidator(MAX_HANDOFF_MINUTES)],
        help_text="A message written from the business's phone (not sent by the hub) pauses "
        "the bot in that chat for this many minutes after the last one. 0: never.",
    )
    bot_off_keyword = models.CharField(
        max_length=64,
        blank=True,
        default="/bot off",
        validators=[NO_NUL],
        help_text="Typed from the business's phone in a chat: the bot stays quiet there until "
        "the 'bot on' keyword. Blank disables.",
    )
    bot_on_keyword = models.CharField(
        max_length=64,
        blank=True,
        default="/bot on",
        validators=[NO_NUL],
        help_text="Typed from the business's phone: the bot answers in that chat again at once.",
    )
    debounce_seconds = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(MAX_DEBOUNCE_SECONDS)],
        help_text="Messages of a chat less than this many seconds apart get one answer. "
        f"0: off. At most {MAX_DEBOUNCE_SECONDS}; a chat that keeps typing is answered "
        "at the latest 3 times this after its first message.",
    )
    group_policy = models.CharField(
        max_length=16,
        choices=GroupPolicy.choices,
        default=GroupPolicy.IGNORE,
        help_text="Which group messages the bot answers; its reply quotes the message.",
    )
    bot_ids = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_bot_ids],
        help_text="More ids of the bot's own account for mentions in groups (digits or "
        "…@lid). The phone id is learned from Evolution when the number connects.",
    )
    allow_list = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_chat_patterns],
        help_text="When not empty, only these chats are answered: phone numbers (a trailing "
        "* matches a prefix) or group JIDs.",
    )
    block_list = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_chat_patterns],
        help_text="Chats never answered: phone numbers (a trailing * matches a prefix) or "
        "group JIDs. In a group the sender's number is checked too.",
    )
    reset_keyword = models.CharField(
        max_length=64,
        blank=True,
        default="/reset",
        validators=[NO_NUL],
        help_text="A user message equal to it starts a new agent session. Blank disables.",
    )
    reset_reply = models.TextField(
        blank=True,
        default=DEFAULT_RESET_REPLY,
        validators=[NO_NUL],
        help_text="The answer to the reset keyword. Blank sends nothing.",
    )
    session_idle_minutes = models.PositiveIntegerField(
        default=0,
        help_text="After this many minutes without a message, the chat's next message "
        "starts a new agent session. 0: never.",
    )
    opt_out_keywords = models.JSONField(
        "opt-out keywords",
        default=default_opt_out_keywords,
        blank=True,
        validators=[validate_keywords],
        help_text="A user message equal to one of these (trimmed, case-insensitive) adds the "
        "number to the instance's opt-out list: API sends to it are refused. Its own later "
        "messages are still answered. Empty: no keywords.",
    )
    opt_out_reply = models.TextField(
        "opt-out reply",
        blank=True,
        default=DEFAULT_OPT_OUT_REPLY,
        validators=[NO_NUL],
        help_text="The answer to an opt-out keyword (the agent is not asked). Blank sends nothing.",
    )
    max_concurrent = models.PositiveIntegerField(
        default=16,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text="At most this many of the instance's chats are with the agent at once, "
        "across all workers.",
    )
    # The token before the last change: Evolution keeps retrying deliveries with
    # it, and drops one for good on 401. Accepted for WEBHOOK_TOKEN_GRACE_HOURS
    # after token_rotated_at. Set by save(), never shown anywhere.
    previous_webhook_token = models.CharField(max_length=512, blank=True, editable=False)
    token_rotated_at = models.DateTimeField(null=True, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "instance"
        # Checked by the REST API (instances/permissions.py), besides the model's own.
        permissions = [
            ("provision_instance", "Can provision an instance on Evolution and link a phone"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"],
                condition=models.Q(is_default=True),
                name="instances_one_default",
                violation_error_message="Another instance is already the default.",
            )
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remember_stored()

    def __setattr__(self, name: str, value: Any) -> None:
        # Tracked only once __init__ is done: loading a row assigns every field.
        if name in _TRACKED_SECRETS and "_secrets_given" in self.__dict__:
            self._secrets_given.add(name)
        super().__setattr__(name, value)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        # Never let a secret reach a log line through repr().
        return f"<InstanceConfig {self.name!r}>"

    def save(self, *args: Any, **kwargs: Any) -> None:
        update_fields = kwargs.get("update_fields")
        saves_token = update_fields is None or "webhook_token" in update_fields
        rotated = saves_token and self._record_token_rotation(now=timezone.now())
        if rotated and update_fields is not None:
            kwargs["update_fields"] = {*update_fields, "previous_webhook_token", "token_rotated_at"}
        super().save(*args, **kwargs)
        self._remember_stored(fields=None if update_fields is None else set(update_fields))

    @classmethod
    def from_stored(cls, db: str, values: Sequence[Any]) -> "InstanceConfig":
        """As from_db with every concrete field's value, in their order, without
        Model.__init__: with 60 fields, each assigned through __setattr__, it was
        a tenth of storing a delivery (every webhook reads its instance)."""
        names = [f.attname for f in cls._meta.concrete_fields]
        if signals.post_init.has_listeners(cls):
            return cls.from_db(db, names, values)
        new = cls.__new__(cls)
        new.__dict__.update(zip(names, values, strict=True))
        new._state = ModelState()
        new._state.adding = False
        new._state.db = db
        new._remember_stored()
        return new

    def _remember_stored(self, *, fields: set[str] | None = None) -> None:
        """The values as stored (of `fields` only, after a partial save), which
        clean() and save() compare the new ones with."""
        if fields is not None:
            saved_urls = KEY_OF_URL.keys() & fields
            self._stored_urls.update({url: getattr(self, url) for url in saved_urls})
            if "webhook_token" in fields:
                self._stored_webhook_token = self.webhook_token
            self._secrets_given -= fields
            return
        self._stored_name = self.name if self.pk else None
        self._stored_urls = {url: getattr(self, url) for url in KEY_OF_URL} if self.pk else {}
        self._stored_webhook_token = self.webhook_token if self.pk else ""
        # The secrets assigned since: a key "given" in this change, even if unchanged.
        self._secrets_given: set[str] = set()

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        super().refresh_from_db(*args, **kwargs)
        self._remember_stored()

    def _record_token_rotation(self, *, now: datetime) -> bool:
        """Keep the stored token as the previous one when a new one replaces it."""
        old = self._stored_webhook_token
        if self.pk is None or self.webhook_token == old:
            return False
        # From no token to one: no previous token, not even one of an older rotation.
        self.previous_webhook_token = old
        self.token_rotated_at = now if old else None
        return True

    def accepted_webhook_tokens(self, *, now: datetime | None = None) -> list[str]:
        """The current token, and the previous one during the grace period after a rotation."""
        tokens = [self.webhook_token]
        if self.previous_webhook_token and self.token_rotated_at is not None:
            grace = timedelta(hours=settings.WEBHOOK_TOKEN_GRACE_HOURS)
            if (now or timezone.now()) < self.token_rotated_at + grace:
                tokens.append(self.previous_webhook_token)
        return tokens

    def accepts_webhook_token(self, given: str) -> bool:
        # Each comparison in constant time; which one matched may show, not the tokens.
        return any(
            hmac.compare_digest(given.encode(), token.encode())
            for token in self.accepted_webhook_tokens()
        )

    def clean_fields(self, *args: Any, **kwargs: Any) -> None:
        # It assigns every field its cleaned value: that gives no key anew.
        given = set(self._secrets_given)
        try:
            super().clean_fields(*args, **kwargs)
        finally:
            self._secrets_given = given

    def clean(self) -> None:
        errors: dict[str, str] = {}
        for url_field, key_field in KEY_OF_URL.items():
            if self._moves_key_to_another_host(url_field=url_field, key_field=key_field):
                errors[key_field] = key_refusal(
                    url_label=str(self._meta.get_field(url_field).verbose_name),
                    url=getattr(self, url_field),
                    key_label=str(self._meta.get_field(key_field).verbose_name),
                )
        if not self.agent_api_key and self.agent_kind not in KINDS_WITHOUT_KEY:
            errors["agent_api_key"] = AGENT_KEY_REQUIRED
        if self._stored_name and self.name != self._stored_name:
            errors["name"] = (
                "An instance cannot be renamed: Evolution posts to a URL holding its name. "
                "Create a new instance instead."
            )
        if not self.legacy_mode:
            for field in ("evolution_url", "evolution_key"):
                if not getattr(self, field):
                    errors[field] = (
                        "Required unless legacy mode is on (replies through the server "
                        "deliveries name)."
                    )
        elif bool(self.evolution_url) != bool(self.evolution_key):
            errors["evolution_key" if self.evolution_url else "evolution_url"] = (
                "Set both the Evolution URL and key, or leave both blank (legacy mode)."
            )
        keywords = {
            name: getattr(self, name).strip().casefold()
            for name in ("bot_off_keyword", "bot_on_keyword", "reset_keyword")
        }
        if (
            keywords["bot_off_keyword"]
            and keywords["bot_off_keyword"] == keywords["bot_on_keyword"]
        ):
            errors["bot_on_keyword"] = "Must differ from the 'bot off' keyword."
        if "whatsapp_instance" not in errors:
            other = self.evolution_instance_owner()
            if other is not None:
                errors["whatsapp_instance"] = (
                    f'Instance "{other}" already uses the Evolution instance '
                    f'"{self.evolution_instance_name}" on {self.evolution_url}: both would '
                    "receive and answer the same messages. Set another WhatsApp instance."
                )
        if errors:
            raise ValidationError(errors)

    @property
    def evolution_instance_name(self) -> str:
        """The instance's name inside Evolution: whatsapp_instance, or else its name."""
        return self.whatsapp_instance or self.name

    def evolution_instance_owner(self) -> str | None:
        """Another tenant on the same Evolution URL with the same Evolution instance.

        Checked here rather than by a database constraint: the name is derived
        (whatsapp_instance or name) and URLs that differ only in a trailing
        slash or the host's case are one server.
        """
        name = self.evolution_instance_name
        if not self.evolution_url or not name or "\x00" in name + self.evolution_url:
            # A NUL is refused by the field's own validator, and PostgreSQL
            # refuses it even in a query.
            return None
        own = normalized_url(self.evolution_url)
        candidates = InstanceConfig.objects.filter(
            models.Q(whatsapp_instance=self.evolution_instance_name)
            | models.Q(whatsapp_instance="", name=self.evolution_instance_name)
        ).exclude(evolution_url="")
        if self.pk is not None:
            candidates = candidates.exclude(pk=self.pk)
        for name, url in candidates.values_list("name", "evolution_url"):
            if normalized_url(url) == own:
                return str(name)
        return None

    def _moves_key_to_another_host(self, *, url_field: str, key_field: str) -> bool:
        stored_url = self._stored_urls.get(url_field)
        new_url = getattr(self, url_field)
        if not stored_url or not new_url or not getattr(self, key_field):
            # Nothing stored to leak, or no URL/key (the other rules speak then).
            return False
        if key_field in self._secrets_given:
            return False
        new_origin = url_origin(new_url)
        # An unreadable URL gets its own field's error.
        return new_origin is not None and new_origin != url_origin(stored_url)

    # --- derived values used by the pipeline and the interfaces ---
    @property
    def is_legacy(self) -> bool:
        """Legacy mode without Evolution credentials: replies go to the pinned server."""
        return self.legacy_mode and not self.evolution_url

    @property
    def webhook_path(self) -> str:
        return f"/webhook/evolution/{quote(self.name)}"

    @property
    def webhook_url(self) -> str:
        return f"{settings.PUBLIC_BASE_URL}{self.webhook_path}"

    @property
    def webhook_url_with_token(self) -> str:
        if not self.webhook_token:
            return self.webhook_url
        return f"{self.webhook_url}?token={quote(self.webhook_token)}"

    @property
    def session_prefix(self) -> str:
        if self.session_id_prefix or self.legacy_mode:
            return self.session_id_prefix
        return f"{self.name}_"


def _same_as_instance(name: str) -> models.Field:
    """A copy of the instance's agent field: an agent row's field is the same one."""
    return InstanceConfig._meta.get_field(name).clone()


def key_refusal(*, url_label: str, url: str, key_label: str) -> str:
    return (
        f"The {url_label} now points at another host ({url_origin(url)}): give the "
        f"{key_label} again in the same change, so that the stored key is never sent "
        "to a host it was not meant for."
    )


class Agent(models.Model):
    """One more agent of an instance, chosen by its routing rules (Route).

    Its fields are the instance's agent fields (the instance's own are its
    default agent); how it is called is its kind's (instances/clients/agents/).
    """

    instance = models.ForeignKey(InstanceConfig, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(
        max_length=64,
        validators=[validate_agent_name],
        help_text="How routing rules and the API name it: letters, digits, '_' and '-', "
        "starting with a letter. It ends the agent's session names, so it cannot be changed.",
    )
    agent_kind = _same_as_instance("agent_kind")
    agent_api_url = _same_as_instance("agent_api_url")
    agent_api_key = _same_as_instance("agent_api_key")
    default_agent = _same_as_instance("default_agent")
    system_prompt = _same_as_instance("system_prompt")
    agent_timeout = _same_as_instance("agent_timeout")
    history_limit = _same_as_instance("history_limit")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["instance", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "name"],
                name="instances_agent_unique_name",
                violation_error_message="The instance already has an agent of this name.",
            )
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remember_stored()

    def __setattr__(self, name: str, value: Any) -> None:
        # As the instance's: a key assigned in this change counts as given again.
        if name == "agent_api_key" and "_key_given" in self.__dict__:
            self._key_given = True
        super().__setattr__(name, value)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Agent {self.name!r}>"

    def save(self, *args: Any, **kwargs: Any) -> None:
        super().save(*args, **kwargs)
        self._remember_stored()

    def _remember_stored(self) -> None:
        # From __dict__: a row loaded with deferred fields (a cascade's collector
        # reads only ids) must not load them here.
        stored = self.__dict__ if self.pk else {}
        self._stored_name = stored.get("name")
        self._stored_url = stored.get("agent_api_url") or ""
        self._key_given = False

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        super().refresh_from_db(*args, **kwargs)
        self._remember_stored()

    def clean_fields(self, *args: Any, **kwargs: Any) -> None:
        # It assigns every field its cleaned value: that gives no key anew.
        given = self._key_given
        try:
            super().clean_fields(*args, **kwargs)
        finally:
            self._key_given = given

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self._stored_name and self.name != self._stored_name:
            errors["name"] = (
                "An agent cannot be renamed: its name is in its chats' session names. "
                "Create a new agent instead."
            )
        new_origin = url_origin(self.agent_api_url) if self.agent_api_url else None
        if (
            self._stored_url
            and self.agent_api_key
            and not self._key_given
            and new_origin is not None
            and new_origin != url_origin(self._stored_url)
        ):
            errors["agent_api_key"] = key_refusal(
                url_label="Agent API URL", url=self.agent_api_url, key_label="Agent API key"
            )
        if not self.agent_api_key and self.agent_kind not in KINDS_WITHOUT_KEY:
            errors["agent_api_key"] = AGENT_KEY_REQUIRED
        if errors:
            raise ValidationError(errors)

    @property
    def session_suffix(self) -> str:
        """What its sessions add to the chat's: its name."""
        return self.name


class RouteMatch(models.TextChoices):
    KEYWORD = "keyword", "Keyword: the whole message equals it (case-insensitive)"
    PREFIX = "prefix", "Prefix: the message starts with it (case-insensitive)"
    CONTAINS = "contains", "Contains: the message contains it (case-insensitive)"
    REGEX = "regex", "Regex: a Python regular expression found in the message"
    CHAT = "chat", "Chat: a phone number (a trailing * matches a prefix) or a group JID"


MAX_ROUTE_VALUE = 200


class Route(models.Model):
    """A routing rule: messages it matches go to its agent, and bind the chat to it.

    The rules of an instance are tried by position (webhooks/routing.py).
    """

    instance = models.ForeignKey(InstanceConfig, on_delete=models.CASCADE, related_name="routes")
    position = models.PositiveIntegerField(
        blank=True,
        help_text="Rules are tried from the lowest position up; the first that matches wins "
        "(equal positions: the older rule first). Blank: after the last rule.",
    )
    match = models.CharField(max_length=16, choices=RouteMatch.choices)
    value = models.CharField(
        max_length=MAX_ROUTE_VALUE,
        validators=[NO_NUL],
        help_text="The keyword, prefix, text, regular expression or chat the rule matches.",
    )
    # NULL: the instance's own (default) agent, "default" in the API and the CLI.
    # RESTRICT: an agent that rules point at is not deleted from under them (the
    # instance, deleted with its rules and agents, is).
    agent = models.ForeignKey(
        Agent,
        on_delete=models.RESTRICT,
        null=True,
        blank=True,
        related_name="routes",
        help_text="Where the matched messages go. Empty: the instance's own agent.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["instance", "position", "id"]
        indexes = [models.Index(fields=["instance", "position"], name="instances_route_order")]

    def __str__(self) -> str:
        return f"{self.match} {self.value!r} -> {self.agent_name}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.position is None:
            last = Route.objects.filter(instance_id=self.instance_id).aggregate(
                last=models.Max("position")
            )["last"]
            self.position = 1 if last is None else last + 1
        super().save(*args, **kwargs)

    @property
    def agent_name(self) -> str:
        return self.agent.name if self.agent_id is not None else DEFAULT_AGENT_NAME

    def clean(self) -> None:
        errors: dict[str, str] = {}
        error = route_value_error(match=self.match, value=self.value)
        if error:
            errors["value"] = error
        if (
            self.agent_id is not None
            and self.instance_id is not None
            and self.agent.instance_id != self.instance_id
        ):
            errors["agent"] = "The agent belongs to another instance."
        if errors:
            raise ValidationError(errors)


def route_value_error(*, match: str, value: str) -> str | None:
    """Why a rule's value cannot be used, or None: checked when saved, never per message."""
    if match == RouteMatch.REGEX:
        try:
            re.compile(value)
        except re.error as exc:
            return f"Not a valid regular expression: {exc}."
        return None
    if match == RouteMatch.CHAT:
        try:
            validate_chat_pattern(value)
        except ValidationError as exc:
            return exc.messages[0]
        return None
    if not value.strip():
        return "Enter the text to match."
    return None


# --- send keys: an integration that may only send through one instance --------------
SEND_KEY_PREFIX = "omnihub_send_"
# What the admin, the API and the CLI show of a key: its prefix and a few characters.
SEND_KEY_SHOWN = len(SEND_KEY_PREFIX) + 4


def hash_send_key(key: str) -> str:
    """The stored form of a send key: SHA-256 of it, hex.

    A key is 32 random bytes (secrets.token_urlsafe), so a fast hash is enough:
    there is nothing to guess by brute force, unlike a password.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def generate_send_key() -> str:
    return SEND_KEY_PREFIX + secrets.token_urlsafe(32)


class SendKeyQuerySet(models.QuerySet["SendKey"]):
    def active(self) -> "SendKeyQuerySet":
        return self.filter(revoked_at__isnull=True)


class SendKey(models.Model):
    """A key (header x-api-key) that may send messages through its instance and do
    nothing else (instances/authentication.py, instances/permissions.py).

    Only its SHA-256 is stored: the key itself is shown once, when it is made.
    """

    instance = models.ForeignKey(
        InstanceConfig, on_delete=models.CASCADE, related_name="send_keys"
    )
    name = models.CharField(
        max_length=100,
        blank=True,
        validators=[NO_NUL],
        help_text="What uses the key (e.g. 'crm'), for the operator; optional.",
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The key's first characters, shown to tell keys apart; never enough to use it.
    shown_prefix = models.CharField("key starts with", max_length=32, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = SendKeyQuerySet.as_manager()

    class Meta:
        ordering = ["instance", "-id"]
        verbose_name = "send key"

    def __str__(self) -> str:
        return f"{self.shown_prefix}… ({self.name or 'unnamed'})"

    def __repr__(self) -> str:
        return f"<SendKey {self.pk} of instance {self.instance_id}>"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def set_new_key(self) -> str:
        """Give the row a new random key; returns it (the only time it is readable)."""
        key = generate_send_key()
        self.key_hash = hash_send_key(key)
        self.shown_prefix = key[:SEND_KEY_SHOWN]
        return key

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(self.key_hash, hash_send_key(key))
