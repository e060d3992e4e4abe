"""The message log in the admin: read-only, with a retry action for failed messages."""

import json
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from webhooks.admin_media import media_facts, media_html, media_response
from webhooks.models import InboundMessage, OptOut, Status
from webhooks.parsing import MEDIA_TYPES
from webhooks.services import retry_messages

# Longer strings without a space are media (base64) or similar blobs: a video
# is megabytes of it, which would make the page unusable.
BLOB_MIN_LENGTH = 200
# Evolution sends thumbnails and keys as arrays of byte values.
BYTES_MIN_LENGTH = 32

STATUS_COLORS = {
    Status.QUEUED: "#64748b",
    Status.PROCESSING: "#2563eb",
    Status.REPLIED: "#15803d",
    Status.IGNORED: "#78716c",
    Status.FAILED: "#b91c1c",
}
# The list's marker of a message with a file (its type, from the message_type column).
MEDIA_MARKER_STYLE = (
    "border: 1px solid currentColor; border-radius: 6px; padding: 0 5px; font-size: 0.85em; "
    "white-space: nowrap"
)
PRE_STYLE = "max-height: 32em; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere"


def shorten_blobs(value: Any) -> Any:
    """A copy of a JSON value with base64-like strings and byte arrays cut short."""
    if isinstance(value, dict):
        return {key: shorten_blobs(item) for key, item in value.items()}
    if isinstance(value, list):
        if len(value) >= BYTES_MIN_LENGTH and all(type(item) is int for item in value):
            return f"[… {len(value)} numbers]"
        return [shorten_blobs(item) for item in value]
    if isinstance(value, str) and len(value) > BLOB_MIN_LENGTH and " " not in value:
        return f"{value[:BLOB_MIN_LENGTH]}… ({len(value)} chars)"
    return value


def pretty_json(value: Any) -> SafeString | str:
    if value is None:
        return "-"
    text = json.dumps(shorten_blobs(value), indent=2, ensure_ascii=False, sort_keys=False)
    return format_html('<pre style="{}">{}</pre>', PRE_STYLE, text)


def format_duration(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def between(start: datetime | None, end: datetime | None) -> timedelta | None:
    if start is None or end is None:
        return None
    return end - start


def local_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def total_time(message: InboundMessage) -> timedelta | None:
    return between(message.received_at, message.finished_at or message.sent_at)


@admin.register(InboundMessage)
class InboundMessageAdmin(admin.ModelAdmin):
    list_display = [
        "received",
        "instance",
        "chat",
        "name",
        "kind",
        "status_badge",
        "total_time_display",
    ]
    list_display_links = ["received"]
    # No date_hierarchy and no filter by message type: each runs a SELECT
    # DISTINCT over the whole table on every page view.
    list_filter = ["status", "instance", "received_at", "used_fallback"]
    list_select_related = ["instance"]
    search_fields = ["phone", "push_name", "text", "=message_id"]
    search_help_text = "Phone number, name or text (contains), or the exact message id."
    ordering = ["-id"]
    # COUNT(*) of a big table on every page view costs more than it tells.
    show_full_result_count = False
    actions = ["retry_failed"]
    # Never shown: the legacy reply key is a credential, the claim token is the
    # worker's lock and editing it by hand would break the claim.
    exclude = ["reply_api_key", "claim_token"]
    fieldsets = [
        (
            "Message",
            {
                "fields": [
                    "instance",
                    "status_badge",
                    "ignore_reason",
                    "message_id",
                    "chat_jid",
                    "sender_jid",
                    "phone",
                    "push_name",
                    "message_type",
                    "text",
                    "message_timestamp",
                ]
            },
        ),
        (
            "Processing",
            {
                "fields": [
                    "timeline",
                    "attempts_display",
                    "next_attempt_at",
                    "last_error_display",
                    "used_fallback",
                ]
            },
        ),
        (
            "Agent",
            {"fields": ["reply_text_display", "agent_request_display", "agent_response_display"]},
        ),
        (
            "Delivery",
            {
                "fields": ["content_display", "payload_display"],
                "description": "As received from Evolution, without its apikey. "
                "Media data and byte arrays are cut short.",
            },
        ),
    ]
    readonly_fields = [
        "status_badge",
        "media_display",
        "timeline",
        "attempts_display",
        "last_error_display",
        "reply_text_display",
        "agent_request_display",
        "agent_response_display",
        "content_display",
        "payload_display",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[InboundMessage]:
        # The JSON columns can hold megabytes of media; the list never needs
        # them and the detail page loads each when it shows it.
        return (
            super()
            .get_queryset(request)
            .defer("payload", "content", "agent_request", "agent_response", "reply_api_key")
        )

    def get_fieldsets(
        self, request: HttpRequest, obj: InboundMessage | None = None
    ) -> list[tuple[str | None, dict[str, Any]]]:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None and (media_facts(obj.content) is not None or obj.transcript):
            fieldsets.insert(1, ("Media", {"fields": ["media_display"]}))
        return fieldsets

    def get_urls(self) -> list[URLPattern]:
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        media = path(
            "<int:object_id>/media/",
            # cacheable: the view sets its own Cache-Control (admin_view's never_cache
            # would make the browser fetch a thumbnail from Evolution on every page).
            self.admin_site.admin_view(self.media_view, cacheable=True),
            name=f"{info}_media",
        )
        return [media, *super().get_urls()]

    def media_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """The message's file, to staff who may view the message (admin_view sends
        anyone else to the login page). Read from the delivery, else from Evolution."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        message = get_object_or_404(InboundMessage.objects.select_related("instance"), pk=object_id)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Media not available",
        }
        return media_response(request, message, context)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: InboundMessage | None = None
    ) -> bool:
        # The list keeps the permission (a user holding it may expect to act on
        # the list; the retry action itself needs webhooks.retry_message); a
        # message itself is never edited: the page shows it read-only.
        return obj is None and super().has_change_permission(request)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        # Deleting stays possible (a tenant's deletion takes its log along),
        # but a single message's page offers no delete button.
        extra_context = {**(extra_context or {}), "show_delete": False}
        return super().change_view(request, object_id, form_url, extra_context)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        # The log is pruned by `manage.py prune_messages`, by age, not by hand.
        # Delete permission itself stays: deleting a tenant deletes its log.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    # --- list columns -----------------------------------------------------
    @admin.display(description="Received", ordering="received_at")
    def received(self, obj: InboundMessage) -> str:
        return local_time(obj.received_at)[:-4]

    @admin.display(description="Chat", ordering="phone")
    def chat(self, obj: InboundMessage) -> str:
        return obj.phone or obj.chat_jid

    @admin.display(description="Name", ordering="push_name")
    def name(self, obj: InboundMessage) -> str:
        return obj.push_name or "-"

    @admin.display(description="Type", ordering="message_type")
    def kind(self, obj: InboundMessage) -> SafeString | str:
        # From columns the list loads anyway: content (the media's size) stays deferred.
        if obj.message_type not in MEDIA_TYPES:
            return obj.message_type
        return format_html(
            '<span class="media-marker" style="{}">{}</span>{}',
            MEDIA_MARKER_STYLE,
            obj.message_type,
            format_html(' <span class="media-transcribed">{}</span>', "transcribed")
            if obj.transcript
            else "",
        )

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj: InboundMessage) -> SafeString:
        return format_html(
            '<span style="background: {}; color: #fff; padding: 1px 8px; '
            'border-radius: 8px; white-space: nowrap">{}</span>',
            STATUS_COLORS.get(obj.status, "#64748b"),
            obj.get_status_display(),
        )

    @admin.display(description="Total time")
    def total_time_display(self, obj: InboundMessage) -> str:
        return format_duration(total_time(obj))

    # --- detail page ------------------------------------------------------
    @admin.display(description="Media")
    def media_display(self, obj: InboundMessage) -> SafeString | str:
        # The page itself needs the view permission the file's view needs.
        return media_html(obj, can_open=True)

    @admin.display(description="Timeline")
    def timeline(self, obj: InboundMessage) -> SafeString:
        steps = [
            ("Received", obj.received_at, None, ""),
            (
                "Agent started",
                obj.agent_started_at,
                between(obj.received_at, obj.agent_started_at),
                "after receipt",
            ),
            (
                "Agent answered",
                obj.agent_finished_at,
                between(obj.agent_started_at, obj.agent_finished_at),
                "agent time",
            ),
            ("Sent", obj.sent_at, between(obj.agent_finished_at, obj.sent_at), "after the answer"),
            ("Finished", obj.finished_at, between(obj.received_at, obj.finished_at), "in total"),
        ]
        rows = format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td><td>{}</td></tr>",
            (
                (
                    label,
                    local_time(when),
                    f"+{format_duration(delta)} {note}" if delta is not None else "",
                )
                for label, when, delta, note in steps
            ),
        )
        return format_html("<table>{}</table>", rows)

    @admin.display(description="Attempts")
    def attempts_display(self, obj: InboundMessage) -> str:
        return (
            f"{obj.attempts} claimed by a worker, {obj.agent_attempts} to the agent, "
            f"{obj.send_attempts} to send"
        )

    @admin.display(description="Last error")
    def last_error_display(self, obj: InboundMessage) -> SafeString | str:
        if not obj.last_error:
            return "-"
        return format_html('<pre style="{}">{}</pre>', PRE_STYLE, obj.last_error)

    @admin.display(description="Reply")
    def reply_text_display(self, obj: InboundMessage) -> SafeString | str:
        if obj.reply_text is None:
            return "(the agent has not answered)"
        if not obj.reply_text:
            return "(nothing to send)"
        return format_html('<pre style="{}">{}</pre>', PRE_STYLE, obj.reply_text)

    @admin.display(description="Agent request")
    def agent_request_display(self, obj: InboundMessage) -> SafeString | str:
        return pretty_json(obj.agent_request)

    @admin.display(description="Agent response")
    def agent_response_display(self, obj: InboundMessage) -> SafeString | str:
        return pretty_json(obj.agent_response)

    @admin.display(description="Normalized message")
    def content_display(self, obj: InboundMessage) -> SafeString | str:
        return pretty_json(obj.content)

    @admin.display(description="Raw payload")
    def payload_display(self, obj: InboundMessage) -> SafeString | str:
        return pretty_json(obj.payload)

    # --- actions ----------------------------------------------------------
    def has_retry_permission(self, request: HttpRequest) -> bool:
        # The permission the REST API's retry action needs too.
        return bool(request.user.has_perm(f"{self.opts.app_label}.retry_message"))

    @admin.action(description="Retry selected failed messages", permissions=["retry"])
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[InboundMessage]) -> None:
        selected = queryset.count()
        not_failed = queryset.exclude(status=Status.FAILED).count()
        requeued = retry_messages(queryset_or_ids=queryset)
        text = f"Requeued {requeued} of {selected} selected messages."
        if not_failed:
            text += f" Skipped {not_failed} that are not failed."
        if selected - not_failed - requeued > 0:
            text += (
                f" Skipped {selected - not_failed - requeued} from the legacy route: the "
                "default instance needs its own Evolution URL and key to send them."
            )
        self.message_user(request, text, messages.SUCCESS if requeued else messages.WARNING)


@admin.register(OptOut)
class OptOutAdmin(admin.ModelAdmin):
    """Opted-out numbers: API sends to them are refused; deleting one allows them again."""

    list_display = ["phone", "instance", "keyword", "at"]
    list_filter = ["instance"]
    list_select_related = ["instance"]
    search_fields = ["phone"]
    readonly_fields = ["instance", "phone", "keyword", "at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
