from django.db import models

from instances.models import InstanceConfig


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

    instance = models.ForeignKey(InstanceConfig, on_delete=models.CASCADE, related_name="messages")
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
    # None: the agent has not answered yet; "": it answered with nothing to send.
    reply_text = models.TextField(null=True, blank=True)  # noqa: DJ001
    used_fallback = models.BooleanField(default=False)

    message_timestamp = models.DateTimeField(null=True, blank=True)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    agent_started_at = models.DateTimeField(null=True, blank=True)
    agent_finished_at = models.DateTimeField(null=True, blank=True)
    first_send_failed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        # Checked by the REST API (instances/permissions.py), besides the model's own.
        # manage_conversation is for the conversation actions (hand over to a
        # human, give back): they act on a chat, whose rows are these messages.
        permissions = [
            ("retry_message", "Can put a failed message back in the queue"),
            ("manage_conversation", "Can take over or give back a conversation"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["instance", "message_id"], name="webhooks_unique_delivery"
            )
        ]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="webhooks_due"),
            models.Index(fields=["instance", "chat_jid", "id"], name="webhooks_chat_order"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id}:{self.message_id}"


class ConnectionState(models.Model):
    """The last connection.update of an instance: one row each, updated in place."""

    instance = models.OneToOneField(
        InstanceConfig, on_delete=models.CASCADE, related_name="connection"
    )
    state = models.CharField(max_length=32, blank=True)
    status_reason = models.IntegerField(null=True, blank=True)
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
