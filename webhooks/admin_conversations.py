"""Conversations in the admin: a list of chats, and a page that reads like the chat,
with buttons to pause, resume and reset the bot there."""

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.views.decorators.http import require_POST

from webhooks.admin import STATUS_COLORS, local_time
from webhooks.admin_media import media_facts, media_html
from webhooks.models import Conversation, InboundMessage, OutboundMessage
from webhooks.operator_messages import MAX_OPERATOR_TEXT, queue_operator_message
from webhooks.selectors import chat_messages, current_session, paused_now_q
from webhooks.transitions import pause_conversation, reset_conversation, resume_conversation

# Whether the page's user may open the chat's files (set for one change_view).
_can_open_media: ContextVar[bool] = ContextVar("can_open_media", default=False)
ACTIONS = [("pause", "Pause the bot"), ("resume", "Resume the bot"), ("reset", "Reset session")]
BUBBLE = (
    "max-width: 36em; padding: 6px 10px; border-radius: 10px; margin: 4px 0; "
    "white-space: pre-wrap; overflow-wrap: anywhere"
)
USER_BUBBLE = f"{BUBBLE}; background: var(--darkened-bg); margin-right: auto"
BOT_BUBBLE = f"{BUBBLE}; background: #dcf8c6; color: #111; margin-left: auto"
OPERATOR_BUBBLE = f"{BUBBLE}; background: #cfe3ff; color: #111; margin-left: auto"


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("paused", "Paused")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> Any:
        if self.value() == "paused":
            return queryset.filter(paused_now_q(timezone.now()))
        if self.value() == "active":
            return queryset.exclude(paused_now_q(timezone.now()))
        return queryset


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["chat", "instance", "name", "state_badge", "last_message"]
    list_filter = [StateFilter, "instance"]
    list_select_related = ["instance", "bound_agent"]
    search_fields = ["phone", "push_name", "=chat_jid"]
    search_help_text = "Phone number or name (contains), or the exact chat JID."
    show_full_result_count = False
    fields = [
        "instance",
        "chat_jid",
        "push_name",
        "state_badge",
        "pause_reason",
        "paused_until",
        "agent_display",
        "session_display",
        "chat_display",
    ]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def can_manage(self, request: HttpRequest) -> bool:
        # The same permission as the API's pause/resume/reset (instances/permissions.py).
        return request.user.has_perm("webhooks.manage_conversation")

    def get_urls(self) -> list[URLPattern]:
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        views: dict[str, Callable[..., Any]] = {
            "pause": lambda c: pause_conversation(conversation=c),
            "resume": lambda c: resume_conversation(conversation=c),
            "reset": lambda c: reset_conversation(conversation=c),
        }
        routes = [
            path(
                f"<path:object_id>/{name}/",
                wrap(require_POST(self._action_view(name, change))),
                name=f"{info}_{name}",
            )
            for name, change in views.items()
        ]
        routes.append(
            path(
                "<path:object_id>/reply/",
                wrap(require_POST(self._reply_view)),
                name=f"{info}_reply",
            )
        )
        return [*routes, *super().get_urls()]

    def _reply_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The reply box: the operator's text to the chat (through the outbox), which
        pauses the bot there as a human's message from the phone does."""
        conversation = get_object_or_404(Conversation, pk=object_id)
        url = reverse("admin:webhooks_conversation_change", args=[conversation.pk])
        if not self.can_manage(request):
            self.message_user(request, "You may not change conversations.", messages.ERROR)
            return HttpResponseRedirect(url)
        text = request.POST.get("text", "").strip()
        if not text or len(text) > MAX_OPERATOR_TEXT or "\x00" in text:
            self.message_user(
                request,
                f"Write a message of 1 to {MAX_OPERATOR_TEXT} characters.",
                messages.ERROR,
            )
            return HttpResponseRedirect(url)
        outbound_id = queue_operator_message(
            instance_id=conversation.instance_id,
            chat_jid=conversation.chat_jid,
            text=text,
            user_id=request.user.pk,
        )
        self.message_user(
            request,
            f"Queued to {_chat_label(conversation)} (message {outbound_id}); the bot is paused "
            "in this chat. The thread shows when it is sent.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(url)

    def _action_view(
        self, name: str, change: Callable[[Conversation], Conversation]
    ) -> Callable[..., HttpResponse]:
        done = {"pause": "Paused the bot in", "resume": "Resumed the bot in", "reset": "Reset"}

        def view(request: HttpRequest, object_id: str) -> HttpResponse:
            conversation = get_object_or_404(Conversation, pk=object_id)
            url = reverse("admin:webhooks_conversation_change", args=[conversation.pk])
            if not self.can_manage(request):
                self.message_user(request, "You may not change conversations.", messages.ERROR)
                return HttpResponseRedirect(url)
            change(conversation)
            self.message_user(
                request,
                f"{done[name]} the chat with {_chat_label(conversation)}.",
                messages.SUCCESS,
            )
            return HttpResponseRedirect(url)

        return view

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        # The chat's thumbnails link to the message log's file view: shown to those
        # who may open it (chat_display gets no request; the admin is shared by
        # every request, so this is the request's context, not an attribute).
        token = _can_open_media.set(request.user.has_perm("webhooks.view_inboundmessage"))
        try:
            response = self._change_view(request, object_id, form_url, extra_context)
            if isinstance(response, TemplateResponse):
                response.render()  # The readonly fields are read while rendering.
            return response
        finally:
            _can_open_media.reset(token)

    def _change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str,
        extra_context: dict[str, Any] | None,
    ) -> Any:
        extra_context = {
            **(extra_context or {}),
            "conversation_actions": ACTIONS,
            "can_manage": self.can_manage(request),
            "show_save": False,
            "show_save_and_continue": False,
            "show_delete": False,
        }
        return super().change_view(request, object_id, form_url, extra_context)

    # --- columns ------------------------------------------------------------
    @admin.display(description="Chat", ordering="phone")
    def chat(self, obj: Conversation) -> str:
        return _chat_label(obj)

    @admin.display(description="Name", ordering="push_name")
    def name(self, obj: Conversation) -> str:
        return obj.push_name or "-"

    @admin.display(description="State")
    def state_badge(self, obj: Conversation) -> SafeString:
        paused = obj.state == "paused"
        label = f"paused ({obj.get_pause_reason_display()})" if paused else "active"
        if paused and obj.paused_until:
            label += f" until {local_time(obj.paused_until)[:16]}"
        return format_html(
            '<span style="background: {}; color: #fff; padding: 1px 8px; border-radius: 8px">'
            "{}</span>",
            "#b45309" if paused else "#15803d",
            label,
        )

    @admin.display(description="Last message", ordering="last_message_at")
    def last_message(self, obj: Conversation) -> str:
        return local_time(obj.last_message_at)[:-4]

    @admin.display(description="Agent session")
    def session_display(self, obj: Conversation) -> str:
        return current_session(conversation=obj)

    @admin.display(description="Agent")
    def agent_display(self, obj: Conversation) -> str:
        # Bound by a routing rule until a reset or an idle expiry.
        return obj.bound_agent.name if obj.bound_agent is not None else "default"

    @admin.display(description="Chat")
    def chat_display(self, obj: Conversation) -> SafeString:
        can_open = _can_open_media.get()
        bubbles = []
        # The messages sent without a user's message to answer (an operator's), in time order.
        others = list(
            OutboundMessage.objects.filter(
                instance_id=obj.instance_id, chat_jid=obj.chat_jid, in_reply_to__isnull=True
            )
            .select_related("sent_by")
            .order_by("-id")[:50]
        )[::-1]
        for message in chat_messages(conversation=obj, with_content=True):
            while others and others[0].created_at <= message.received_at:
                bubbles.append(_operator_bubble(others.pop(0)))
            bubbles.append(_user_bubble(message, can_open=can_open))
            if message.reply_text and message.sent_at:
                bubbles.append(
                    format_html(
                        '<div style="{}" class="bot-message">{}<br><small>{} · sent</small></div>',
                        BOT_BUBBLE,
                        message.reply_text,
                        local_time(message.sent_at)[:-4],
                    )
                )
        bubbles.extend(_operator_bubble(sent) for sent in others)
        if not bubbles:
            return format_html("<p>{}</p>", "No messages stored.")
        return format_html(
            '<div style="display: flex; flex-direction: column; min-width: 40em">{}</div>',
            format_html_join("", "{}", ((bubble,) for bubble in bubbles)),
        )


def _user_bubble(message: InboundMessage, *, can_open: bool) -> SafeString:
    status = message.get_status_display().lower()
    if message.ignore_reason:
        status += f": {message.ignore_reason}"
    facts = media_facts(message.content)
    text = message.text
    if text and text in (facts.caption if facts else None, message.transcript):
        text = ""  # Shown with the media: the caption, or the voice note's transcript.
    media = (
        media_html(message, can_open=can_open, facts=facts) if facts or message.transcript else ""
    )
    return format_html(
        '<div style="{}" class="user-message" data-status="{}">{}{}<br>'
        '<small>{} · <span style="color: {}">{}</span></small></div>',
        USER_BUBBLE,
        message.status,
        text or ("" if media else f"[{message.message_type}]"),
        media,
        local_time(message.received_at)[:-4],
        STATUS_COLORS.get(message.status, "#64748b"),
        status,
    )


def _operator_bubble(sent: OutboundMessage) -> SafeString:
    who = sent.sent_by.get_username() if sent.sent_by is not None else "the hub"
    status = sent.status + (f": {sent.error}" if sent.error else "")
    return format_html(
        '<div style="{}" class="operator-message" data-status="{}">{}<br>'
        "<small>{} · by {} · {}</small></div>",
        OPERATOR_BUBBLE,
        sent.status,
        sent.text,
        local_time(sent.created_at)[:-4],
        who,
        status,
    )


def _chat_label(conversation: Conversation) -> str:
    return conversation.phone or conversation.chat_jid
