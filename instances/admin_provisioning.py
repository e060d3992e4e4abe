"""Admin pages that set a tenant up on Evolution: test, provision, link a phone by QR code."""

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.http import require_GET, require_http_methods

from instances import provisioning
from instances.models import InstanceConfig
from instances.provisioning import (
    TOKEN_HEADER,
    WEBHOOK_EVENTS,
    QrReport,
    desired_webhook,
    fetch_qr,
    provision,
    whatsapp_name,
    with_activity,
)

TEMPLATES = "admin/instances/instanceconfig"
NO_VALUE = "—"


def qr_json(report: QrReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "configured": report.configured,
        "state": report.state,
        "connected": report.connected,
        "qr_code": report.qr_code,
        "pairing_code": report.pairing_code,
        "message": report.message,
    }


def provision_plan(instance: InstanceConfig) -> list[str]:
    """What provisioning will do, in words, before the operator confirms it."""
    webhook = desired_webhook(instance)
    token = (
        f"with the {TOKEN_HEADER} header (the instance's token)"
        if webhook["headers"]
        else "without a token header: this instance accepts unauthenticated deliveries"
    )
    return [
        f'Create the instance "{whatsapp_name(instance)}" on Evolution at '
        f"{instance.evolution_url}, unless it exists already.",
        f"Point its webhook at {webhook['url']} for {', '.join(WEBHOOK_EVENTS)}, {token}, "
        "unless it is set so already.",
    ]


class ProvisioningAdminMixin(admin.ModelAdmin):
    """Views, actions and list columns of InstanceConfigAdmin for the Evolution side."""

    def get_urls(self) -> list[URLPattern]:
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        # Before the model admin's own routes: its "<path:object_id>/" catches everything.
        return [
            path(
                "<path:object_id>/test-connections/",
                wrap(self.test_connections_view),
                name=f"{info}_test_connections",
            ),
            path(
                "<path:object_id>/provision/", wrap(self.provision_view), name=f"{info}_provision"
            ),
            path("<path:object_id>/qr/", wrap(self.qr_view), name=f"{info}_qr"),
            path(
                "<path:object_id>/qr/status/", wrap(self.qr_status_view), name=f"{info}_qr_status"
            ),
            *super().get_urls(),
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[InstanceConfig]:
        return with_activity(super().get_queryset(request))

    # --- list columns ---

    @admin.display(description="Connection", ordering="connection__state")
    def connection_state(self, obj: InstanceConfig) -> str:
        connection = provisioning.stored_connection(obj)
        return connection.state if connection is not None and connection.state else NO_VALUE

    @admin.display(description="Last message", ordering="last_message_at", empty_value=NO_VALUE)
    def last_message(self, obj: InstanceConfig) -> Any:
        return provisioning.last_message_at(obj)

    # --- pages ---

    def has_provision_permission(self, request: HttpRequest) -> bool:
        # The permission the REST API's provision and qr actions need too.
        return bool(request.user.has_perm(f"{self.opts.app_label}.provision_instance"))

    def _instance(
        self, request: HttpRequest, object_id: str, *, provision: bool
    ) -> InstanceConfig:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise InstanceConfig.DoesNotExist
        allowed = (
            self.has_provision_permission(request)
            if provision
            else self.has_view_or_change_permission(request, obj)
        )
        if not allowed:
            raise PermissionDenied
        return obj

    def _render(
        self, request: HttpRequest, template: str, obj: InstanceConfig, **context: Any
    ) -> TemplateResponse:
        return TemplateResponse(
            request,
            f"{TEMPLATES}/{template}",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "original": obj,
                "change_url": self._url("change", obj),
                **context,
            },
        )

    def _missing(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)

    def _url(self, name: str, obj: InstanceConfig) -> str:
        return reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_{name}", args=[obj.pk])

    @method_decorator(require_GET)
    def test_connections_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        # Read-only calls (connection state, the agent's /health or /models; a webhook
        # agent is not called): a GET may run them.
        try:
            obj = self._instance(request, object_id, provision=False)
        except InstanceConfig.DoesNotExist:
            return self._missing(request, object_id)
        report = provisioning.test_connections(instance=obj)
        return self._render(
            request,
            "provisioning_report.html",
            obj,
            title=f"Test connections of {obj.name}",
            report=report,
            again_label="Test again",
            again_method="get",
        )

    @method_decorator(require_http_methods(["GET", "POST"]))
    def provision_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        try:
            obj = self._instance(request, object_id, provision=True)
        except InstanceConfig.DoesNotExist:
            return self._missing(request, object_id)
        title = f"Provision {obj.name} on Evolution"
        if request.method == "POST" or not provisioning.is_configured(obj):
            # Unconfigured: provision() answers at once with the reason, no call made.
            # "force" comes from the page's second button, shown only after a
            # run refused to take another tenant's webhook.
            force = request.method == "POST" and request.POST.get("force") == "1"
            report = provision(instance=obj, force=force)
            return self._render(
                request,
                "provisioning_report.html",
                obj,
                title=title,
                report=report,
                again_label="Provision again" if provisioning.is_configured(obj) else "",
                again_method="post",
                force_label=(
                    "Provision anyway: take the webhook over"
                    if provisioning.needs_force(report)
                    else ""
                ),
            )
        return self._render(
            request,
            "provisioning_report.html",
            obj,
            title=title,
            plan=provision_plan(obj),
            again_label="Provision now",
            again_method="post",
        )

    @method_decorator(require_GET)
    def qr_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        try:
            obj = self._instance(request, object_id, provision=True)
        except InstanceConfig.DoesNotExist:
            return self._missing(request, object_id)
        return self._render(
            request,
            "qr.html",
            obj,
            title=f"Connect WhatsApp to {obj.name}",
            report=fetch_qr(instance=obj),
            whatsapp_name=whatsapp_name(obj),
            poll_url=self._url("qr_status", obj),
        )

    @method_decorator(require_GET)
    def qr_status_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        try:
            obj = self._instance(request, object_id, provision=True)
        except InstanceConfig.DoesNotExist:
            return JsonResponse({"ok": False, "message": "No such instance."}, status=404)
        response = JsonResponse(qr_json(fetch_qr(instance=obj)))
        response["Cache-Control"] = "no-store"
        return response

    # --- actions ---

    @admin.action(description="Test connections of the selected instances")
    def test_selected(self, request: HttpRequest, queryset: QuerySet[InstanceConfig]) -> None:
        for instance in queryset:
            report = provisioning.test_connections(instance=instance)
            # Fixed text first: the admin capitalizes a message's first letter.
            self.message_user(
                request,
                f"Test of {instance.name}: {report.detail}",
                messages.SUCCESS if report.ok else messages.ERROR,
            )

    @admin.action(
        description="Provision the selected instances on Evolution", permissions=["provision"]
    )
    def provision_selected(self, request: HttpRequest, queryset: QuerySet[InstanceConfig]) -> None:
        for instance in queryset:
            report = provision(instance=instance)
            self.message_user(
                request,
                f"Provisioning of {instance.name}: {report.detail}",
                messages.SUCCESS if report.ok else messages.ERROR,
            )
