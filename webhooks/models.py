from datetime import datetime

from django.conf import settings
from django.db import models

from instances.models import Agent, InstanceConfig


class Status(models.TextChoices):
    QUEUED = "queued"
    PROCESSING = "processing"
    REPLIED = "replied"
    IGNORED = "ignored"
    FAILED = "failed"


class InboundMessage(models.Model):
    """One delivered WhatsApp message: recorded first, processed by the worker after.

    The row is the job: its status, attempts and next_attempt_at drive the
    worker, and the agent's reply is kept once received, so an Evolution retry
    never calls the agent a second time.
    """

    # No index of its own: webhooks_unique_delivery and webhooks_chat_open start
    # with it (one index fewer for every stored message to update).
    instance = models.ForeignKey(
        InstanceConfig, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    message_id = models.CharField(max_length=128)
    chat_jid = models.CharField(max_length=128)
    sender_jid = models.CharField(max_length=128, blank=True)
    phone = models.CharField(max_length=32, blank=True)
    push_name = models.CharField(max_length=256, blank=True)
    message_type = models.CharField(max_length=32)
    text = models.TextField(blank=True)
    content = models.JSONField(default=dict, help_text="The normalized message.")
    payload = models.JSONField(help_text="The delivery as received, without its apikey.")
    evolution_instance = models.CharField(max_length=128, blank=True)
    # Legacy default instance only: where to send the reply, taken from the
    # delivery (server_url/apikey) as the single-tenant service did. Cleared
    # once the row is finished.
    reply_server_url = models.CharField(max_length=500, blank=True)
    reply_api_key = models.CharField(max_length=512, blank=True)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    ignore_reason = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    agent_attempts = models.PositiveIntegerField(default=0)
    send_attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    claim_token = models.CharField(max_length=32, blank=True)
    last_error = models.TextField(blank=True)
    agent_request = models.JSONField(null=True, blank=True)
    agent_response = models.JSONField(null=True, blank=True)
    # A voice note's text (Evolution's speechToText or the instance's STT), as
    # the agent got it; blank for other messages.
    transcript = models.TextField(blank=True)
    # None: the agent has not answered yet; "": it answered with nothing to send.
    reply_text = models.TextField(null=True, blank=True)  # noqa: DJ001
    used_fallback = models.BooleanField(default=False)
    # The message whose agent call answered this one too (a debounced burst).
    answered_by = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="folded",
        # Indexed where set only (webhooks_answered_by): nearly every row has none.
        db_index=False,
    )
    # A chat's open messages are handled in this order: a retried message goes
    # after what is already open in its chat.
    queued_at = models.DateTimeField(null=True, blank=True)
    session_name = models.CharField(max_length=200, blank=True)

    message_timestamp = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    agent_started_at = models.DateTimeField(null=True, blank=True)
    agent_finished_at = models.DateTimeField(null=True, blank=True)
    first_send_failed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The reply part whose sendText is in flight, and since when: written with
    # the claim check just before the send, cleared as its outcome is recorded on
    # an outbound row. Its echo may arrive before sendText answers: the text tells
    # it from a human's message. Left set (the worker died mid-send), the send may
    # have reached Evolution, which is asked before it goes again. An outbound row
    # written before the send instead put an INSERT and its four index writes
    # between the agent's answer and the sendText (webhooks/reply_sending.py).
    # NULL when nothing is in flight (a nullable column is added without
    # rebuilding a month's inbox on SQLite).
    sending_text = models.TextField(null=True, blank=True)  # noqa: DJ001
    send_started_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        # Checked by the REST API (instances/permissions.py), besides the model's own.
        permissions = [("retry_message", "Can put a failed message back in the queue")]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "message_id"], name="webhooks_unique_delivery"
            )
        ]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="webhooks_due"),
            # A chat's open messages, found without reading its finished ones.
            models.Index(
                fields=["instance", "chat_jid", "status", "id"], name="webhooks_chat_open"
            ),
            # Deleting a message (prune) clears the rows it answered for.
            models.Index(
                fields=["answered_by"],
                condition=models.Q(answered_by__isnull=False),
                name="webhooks_answered_by",
            ),
            # An openai agent's memory: the session's latest answered rows, newest
            # first, read without the chat's other sessions (webhooks/agent_history.py).
            # Only answered rows: a message is stored unanswered, so the webhook's
            # INSERT never updates this index; the worker's answer puts it in.
            models.Index(
                fields=["instance", "chat_jid", "session_name", "id"],
                condition=models.Q(reply_text__isnull=False),
                name="webhooks_session_history",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id}:{self.message_id}"


class PauseReason(models.TextChoices):
    HUMAN = "human takeover"
    BOT_OFF = "bot off"
    OPERATOR = "paused"


def paused_at(*, pause_reason: str, paused_until: datetime | None, now: datetime) -> bool:
    """Whether a chat with this pause is paused at `now` (no end: until resumed)."""
    return bool(pause_reason) and (paused_until is None or paused_until > now)


class Conversation(models.Model):
    """One chat of one instance: its state, and the lease of the worker handling it.

    `due_at` is when a worker should look at the chat; NULL when it has nothing
    to do. While a worker holds the chat (`claim_token` set), `due_at` is the
    end of its lease, so a chat whose worker died is due again by itself. The
    claim reads only due rows of this table, whatever the size of the inbox.
    """

    # No index of its own: webhooks_one_conversation_per_chat starts with it.
    instance = models.ForeignKey(
        InstanceConfig, on_delete=models.CASCADE, related_name="conversations", db_index=False
    )
    chat_jid = models.CharField(max_length=128)
    phone = models.CharField(max_length=32, blank=True)
    push_name = models.CharField(max_length=256, blank=True)
    is_group = models.BooleanField(default=False)

    pause_reason = models.CharField(max_length=32, blank=True, choices=PauseReason.choices)
    # With a pause reason: until when; NULL means until resumed.
    paused_until = models.DateTimeField(null=True, blank=True)
    # Advanced by a reset or an idle expiry: the agent session's number.
    session_epoch = models.PositiveIntegerField(default=1)
    # The agent a routing rule bound the chat to (webhooks/routing.py); NULL: the
    # instance's own. A reset or an idle expiry ends the binding with the session.
    bound_agent = models.ForeignKey(
        Agent,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        # Indexed where set only (webhooks_bound_agent), for deleting an agent.
        db_index=False,
    )
    last_message_at = models.DateTimeField(null=True, blank=True)

    due_at = models.DateTimeField(null=True, blank=True)
    # A debounced chat that keeps typing is answered by this time at the latest.
    due_limit = models.DateTimeField(null=True, blank=True)
    claim_token = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-last_message_at", "-id"]
        # The conversation actions (pause, resume, reset): the API, the admin
        # buttons (instances/permissions.py).
        permissions = [
            ("manage_conversation", "Can pause, resume and reset the bot in a conversation")
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "chat_jid"], name="webhooks_one_conversation_per_chat"
            )
        ]
        indexes = [
            models.Index(fields=["due_at"], name="webhooks_conversation_due"),
            models.Index(
                fields=["bound_agent"],
                condition=models.Q(bound_agent__isnull=False),
                name="webhooks_bound_agent",
            ),
            # The chats held by workers now, per tenant (max_concurrent): a few rows.
            models.Index(
                fields=["instance", "due_at"],
                condition=~models.Q(claim_token=""),
                name="webhooks_conversation_held",
            ),
        ]

    def __str__(self) -> str:
        return self.phone or self.chat_jid

    def paused_now(self, *, now: datetime) -> bool:
        return paused_at(pause_reason=self.pause_reason, paused_until=self.paused_until, now=now)

    @property
    def state(self) -> str:
        from django.utils import timezone

        return "paused" if self.paused_now(now=timezone.now()) else "active"


class OutboundStatus(models.TextChoices):
    # An API or operator send waiting in the outbox (webhooks/outbox.py).
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    # From Evolution's messages.update (DELIVERY_ACK, READ/PLAYED), matched by key.id.
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    # The attempt ended without Evolution's answer (a timeout, a connection
    # dropped after the request was written): it may have been sent. Before the
    # reply goes again, Evolution is asked whether it was (webhooks/duplicates.py).
    UNCONFIRMED = "unconfirmed"


class OutboundKind(models.TextChoices):
    # The agent's answer to a message, sent at once by the chat's worker (reply_sending.py).
    REPLY = "reply"
    # POST /api/v1/instances/{name}/messages/: queued, paced by the dispatcher.
    API = "api"
    # A person writing from the console: queued, paced, ahead of API sends.
    OPERATOR = "operator"


class OutboundMessage(models.Model):
    """A message the hub sent, is sending, or has queued to send through Evolution.

    Its Evolution id (sendText's key.id) is how the hub tells its own messages'
    echoes from a human's messages written on the phone; an echo that arrives
    before sendText answers is known by its text. A row still `sending` when
    its message is handled again, or `unconfirmed`, is an attempt that may have
    reached Evolution.

    A reply's row is written once its send's outcome is known (webhooks/rows.py,
    plain SQL: the new columns have database defaults); meanwhile its message's
    sending_text stands for it, and a send cut short there becomes a `sending`
    row when the message is handled again. API and operator sends are the
    outbox: written `queued`, taken in turn by the dispatcher, and every change
    of their state is in webhooks/outbox.py.
    """

    # No index of its own: webhooks_outbound_key and webhooks_outbound_chat start with it.
    instance = models.ForeignKey(
        InstanceConfig, on_delete=models.CASCADE, related_name="sent", db_index=False
    )
    kind = models.CharField(
        max_length=16,
        choices=OutboundKind.choices,
        default=OutboundKind.REPLY,
        db_default=OutboundKind.REPLY,
    )
    chat_jid = models.CharField(max_length=128)
    # The text sent; a media send's caption.
    text = models.TextField()
    # A media send: {"url" | "base64", "mime_type", "file_name", "caption", "mediatype"}.
    media = models.JSONField(null=True, blank=True)
    in_reply_to = models.ForeignKey(
        InboundMessage, null=True, blank=True, on_delete=models.SET_NULL, related_name="replies"
    )
    evolution_id = models.CharField(max_length=128, blank=True)
    # The staff user who wrote it on the conversation page (an operator's message).
    sent_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    status = models.CharField(
        max_length=16, choices=OutboundStatus.choices, default=OutboundStatus.SENDING
    )
    error = models.TextField(blank=True)
    # Why a queued send is not going yet (the daily limit, a rate-limit pause).
    wait_reason = models.CharField(max_length=200, blank=True, db_default="")
    # The same key for the same instance is the same send (webhooks_outbound_idempotency);
    # request_hash tells a replay from a different body under a used key.
    idempotency_key = models.CharField(max_length=128, blank=True, db_default="")
    request_hash = models.CharField(max_length=64, blank=True, db_default="")
    send_at = models.DateTimeField(null=True, blank=True)
    # When a queued send may go: send_at, or when it was accepted. The order of
    # an instance's sends (a retried one keeps its place): webhooks_outbox_due.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, db_default=0)
    # When the current attempt started (the row became `sending`).
    attempt_started_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["instance", "evolution_id"], name="webhooks_outbound_key"),
            models.Index(fields=["instance", "chat_jid", "status"], name="webhooks_outbound_chat"),
            # The dispatcher's reads of an instance's outbox touch its queued rows
            # only (partial indexes), never the sent ones: the next due one in
            # order, and when the next scheduled one is...
            models.Index(
                fields=["instance", "next_attempt_at", "id"],
                condition=models.Q(status="queued"),
                name="webhooks_outbox_due",
            ),
            # ...the next operator send (ahead of API sends)...
            models.Index(
                fields=["instance", "next_attempt_at", "id"],
                condition=models.Q(status="queued", kind="operator"),
                name="webhooks_outbox_operator",
            ),
            # ...and a send left `sending` or `unconfirmed` (a crash): checked with
            # findMessages before anything else goes. Replies are never in it.
            models.Index(
                fields=["instance", "id"],
                condition=models.Q(
                    status__in=["sending", "unconfirmed"], kind__in=["api", "operator"]
                ),
                name="webhooks_outbox_in_doubt",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="webhooks_outbound_idempotency",
            )
        ]

    def __str__(self) -> str:
        return f"{self.instance_id}:{self.evolution_id or self.pk}"


class OutboxState(models.Model):
    """One instance's outbox: the dispatcher's lease on it and its pacing.

    Like a conversation for the chat workers: `due_at` is when a dispatcher
    should look at the instance (NULL: nothing queued); while one holds it
    (`claim_token` set), `due_at` is the end of its lease. The claim reads only
    due rows of this table, one per instance.
    """

    instance = models.OneToOneField(InstanceConfig, on_delete=models.CASCADE, related_name="outbox")
    due_at = models.DateTimeField(null=True, blank=True)
    claim_token = models.CharField(max_length=32, blank=True)
    # The dispatcher's last send (start of the call); replies are read from their rows.
    last_send_at = models.DateTimeField(null=True, blank=True)
    # The jittered wait chosen at the last send: the next one goes this long after it.
    next_gap_ms = models.PositiveIntegerField(default=0)
    # API sends started on `sends_day` (UTC), for daily_send_limit.
    sends_day = models.DateField(null=True, blank=True)
    sends_today = models.PositiveIntegerField(default=0)
    # The day of the instance's first API send: warmup_days count from it.
    first_send_day = models.DateField(null=True, blank=True)
    # A rate-limit pause: nothing of the outbox goes before paused_until.
    paused_until = models.DateTimeField(null=True, blank=True)
    pause_reason = models.CharField(max_length=200, blank=True)
    # The last pause's length; doubles per pause up to an hour, reset by a success.
    backoff_minutes = models.PositiveIntegerField(default=0)
    # 429/5xx answers in a row (three pause the instance).
    failures_in_row = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["due_at"], name="webhooks_outbox_state_due")]

    def __str__(self) -> str:
        return f"outbox:{self.instance_id}"

    def describe(self) -> str:
        """One line for the console."""
        from django.utils import timezone

        now = timezone.now()
        if self.paused_until and self.paused_until > now:
            left = int((self.paused_until - now).total_seconds() // 60) + 1
            return (
                f"PAUSED until {self.paused_until:%Y-%m-%d %H:%M:%S} UTC (about {left} min): "
                f"{self.pause_reason}"
            )
        parts = ["sending normally"]
        if self.last_send_at:
            parts.append(f"last send {self.last_send_at:%Y-%m-%d %H:%M:%S} UTC")
        if self.sends_day:
            parts.append(f"{self.sends_today} API sends on {self.sends_day}")
        return ", ".join(parts)


class ConnectionState(models.Model):
    """The last connection.update of an instance: one row each, updated in place."""

    instance = models.OneToOneField(
        InstanceConfig, on_delete=models.CASCADE, related_name="connection"
    )
    state = models.CharField(max_length=32, blank=True)
    status_reason = models.IntegerField(null=True, blank=True)
    # The connected account's own JID (connection.update "open" carries it as wuid).
    wuid = models.CharField(max_length=128, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.instance_id}:{self.state}"


class WorkerHeartbeat(models.Model):
    """A running worker says it is alive here, so /health/ready can tell."""

    worker_id = models.CharField(max_length=64, unique=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"


class OptOut(models.Model):
    """A number that sent one of its instance's opt_out_keywords: API sends to it are
    refused (webhooks/opt_out.py). Its own later messages are still answered."""

    instance = models.ForeignKey(
        InstanceConfig, on_delete=models.CASCADE, related_name="opt_outs", db_index=False
    )
    phone = models.CharField(max_length=32)
    keyword = models.CharField(max_length=64, blank=True, help_text="What the user sent.")
    at = models.DateTimeField()

    class Meta:
        ordering = ["-at"]
        verbose_name = "opted-out number"
        constraints = [
            models.UniqueConstraint(fields=["instance", "phone"], name="webhooks_one_opt_out")
        ]

    def __str__(self) -> str:
        return self.phone


class CallbackState(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class StatusCallback(models.Model):
    """One status of an outbound message, to be POSTed to its instance's callback_url.

    The row is the job (webhooks/callbacks.py): written in the transaction that
    changed the status, delivered by the worker's callback loop, retried with
    backoff until CALLBACK_MAX_ATTEMPTS, then kept failed with its last error.
    """

    instance = models.ForeignKey(
        InstanceConfig, on_delete=models.CASCADE, related_name="status_callbacks"
    )
    outbound = models.ForeignKey(
        OutboundMessage, on_delete=models.CASCADE, related_name="status_callbacks"
    )
    status = models.CharField(max_length=16)
    # The JSON posted, byte for byte the same on every attempt (it is what is signed).
    body = models.TextField()
    state = models.CharField(
        max_length=16, choices=CallbackState.choices, default=CallbackState.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    # When the next attempt is due; while an attempt runs, the end of its lease.
    # NULL once delivered or given up.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(next_attempt_at__isnull=False),
                name="webhooks_callback_due",
            )
        ]

    def __str__(self) -> str:
        return f"{self.outbound_id}:{self.status}"
