from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html

from instances import admin_send_keys  # noqa: F401 (registers SendKeyAdmin)
from instances.admin_provisioning import ProvisioningAdminMixin
from instances.admin_routing import AgentInline, RouteInline
from instances.forms import InstanceConfigForm
from instances.models import (
    CALLBACK_FIELDS,
    MEDIA_FIELDS,
    OUTBOUND_FIELDS,
    REPLY_FIELDS,
    InstanceConfig,
)
from instances.services import save_instance, set_default_instance

NO_TOKEN_WARNING = "accepts unauthenticated deliveries"


@admin.register(InstanceConfig)
class InstanceConfigAdmin(ProvisioningAdminMixin, admin.ModelAdmin):
    form = InstanceConfigForm
    inlines = [AgentInline, RouteInline]
    list_display = [
        "name",
        "whatsapp_instance",
        "default_agent",
        "is_default",
        "is_active",
        "has_webhook_token",
        "connection_state",
        "last_message",
        "updated_at",
    ]
    search_fields = ["name", "whatsapp_instance", "default_agent"]
    list_filter = ["is_default", "is_active"]
    readonly_fields = ["webhook_url_display", "webhook_url_with_token_display", "outbox_state"]
    actions = ["make_default", "test_selected", "provision_selected"]

    def get_fieldsets(self, request: HttpRequest, obj: InstanceConfig | None = None) -> Any:
        webhook = ["webhook_token", "no_webhook_token"]
        if obj is not None:
            webhook += ["regenerate_webhook_token", "webhook_url_with_token_display"]
        fieldsets: list[tuple[str | None, dict[str, Any]]] = [
            ("General", {"fields": ["name", "is_active", "is_default"]}),
            (
                "Evolution",
                {
                    "fields": [
                        "evolution_url",
                        "evolution_key",
                        "whatsapp_instance",
                        "webhook_url_display",
                    ]
                },
            ),
            (
                "Agent",
                {
                    "fields": [
                        "agent_kind",
                        "agent_api_url",
                        "agent_api_key",
                        "default_agent",
                        "system_prompt",
                        "history_limit",
                        "agent_timeout",
                        "session_id_prefix",
                    ]
                },
            ),
            ("Behaviour", {"fields": ["fallback_message"]}),
            ("Replies", {"fields": list(REPLY_FIELDS)}),
            ("Media and voice notes", {"fields": list(MEDIA_FIELDS)}),
            ("Status callbacks", {"fields": list(CALLBACK_FIELDS)}),
            (
                "Outbound",
                {"fields": [*OUTBOUND_FIELDS, *(["outbox_state"] if obj is not None else [])]},
            ),
            (
                "Legacy mode (the single-tenant service's behaviour)",
                {"fields": ["legacy_mode", "legacy_server_url"]},
            ),
            (
                "Human takeover",
                {"fields": ["handoff_minutes", "bot_off_keyword", "bot_on_keyword"]},
            ),
            (
                "Bursts and sessions",
                {
                    "fields": [
                        "debounce_seconds",
                        "reset_keyword",
                        "reset_reply",
                        "session_idle_minutes",
                    ]
                },
            ),
            ("Groups", {"fields": ["group_policy", "bot_ids"]}),
            ("Who is answered", {"fields": ["allow_list", "block_list"]}),
            ("Opt-out", {"fields": ["opt_out_keywords", "opt_out_reply"]}),
            ("Capacity", {"fields": ["max_concurrent"]}),
            ("Webhook", {"fields": webhook}),
        ]
        if obj is not None:
            fieldsets.append(("Timestamps", {"fields": ["created_at", "updated_at"]}))
        return fieldsets

    def get_readonly_fields(
        self, request: HttpRequest, obj: InstanceConfig | None = None
    ) -> list[str]:
        readonly = list(self.readonly_fields)
        if obj is not None:
            # Evolution posts to a URL holding the name: the model refuses renames.
            readonly += ["name", "created_at", "updated_at"]
        return readonly

    @admin.display(description="Token")
    def has_webhook_token(self, obj: InstanceConfig) -> str:
        if obj.webhook_token:
            return "yes"
        # The list's warning message says what it means; the cell stays narrow.
        return format_html(
            '<strong style="color: var(--error-fg)" title="{}">none</strong>', NO_TOKEN_WARNING
        )

    @admin.display(description="Outbox now")
    def outbox_state(self, obj: InstanceConfig) -> str:
        """Queued sends and a rate-limit pause (webhooks.OutboxState, by its reverse name)."""
        queued = obj.sent.filter(status="queued").count()
        try:
            state = obj.outbox  # type: ignore[attr-defined]
        except ObjectDoesNotExist:
            return f"{queued} queued; nothing sent through the outbox yet"
        return f"{queued} queued; {state.describe()}"

    @admin.display(description="Webhook URL")
    def webhook_url_display(self, obj: InstanceConfig) -> str:
        if obj.pk is None:
            return "Shown once the instance is saved."
        return obj.webhook_url

    @admin.display(description="Webhook URL for Evolution (with the token)")
    def webhook_url_with_token_display(self, obj: InstanceConfig) -> str:
        # The one place the token is shown: the operator pastes this into Evolution.
        return obj.webhook_url_with_token

    def save_model(
        self, request: HttpRequest, obj: InstanceConfig, form: Any, change: bool
    ) -> None:
        save_instance(instance=obj)

    @admin.action(description="Make the selected instance the default")
    def make_default(self, request: HttpRequest, queryset: QuerySet[InstanceConfig]) -> None:
        names = list(queryset.values_list("name", flat=True)[:2])
        if len(names) != 1:
            self.message_user(
                request,
                "Select exactly one instance to make it the default.",
                messages.ERROR,
            )
            return
        try:
            instance = set_default_instance(name=names[0])
        except ValidationError as exc:
            self.message_user(
                request,
                f"Cannot make {names[0]} the default: {' '.join(exc.messages)}",
                messages.ERROR,
            )
            return
        # Fixed text first: the admin capitalizes a message's first letter.
        self.message_user(request, f"The default instance is now {instance.name}.")

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method == "GET":
            names = list(
                InstanceConfig.objects.filter(webhook_token="").values_list("name", flat=True)
            )
            if names:
                messages.warning(
                    request,
                    f"Without a webhook token, {', '.join(names)} {NO_TOKEN_WARNING}: "
                    "anyone who knows the webhook URL can post to it. Set a token on the "
                    "instance and in Evolution.",
                )
        return super().changelist_view(request, extra_context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method == "GET":
            obj = self.get_object(request, object_id)
            if obj is not None and not obj.webhook_token:
                messages.warning(
                    request,
                    f"This instance has no webhook token: it {NO_TOKEN_WARNING}. "
                    'Tick "Generate a new token" and update the URL in Evolution.',
                )
        return super().change_view(request, object_id, form_url, extra_context)
