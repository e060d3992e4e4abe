"""Send keys in the admin: listed per instance, made (the key shown once) and revoked."""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from instances.models import SendKey
from instances.send_keys import create_send_key, revoke_send_key


class NewSendKeyForm(forms.ModelForm):
    class Meta:
        model = SendKey
        fields = ["instance", "name"]


@admin.register(SendKey)
class SendKeyAdmin(admin.ModelAdmin):
    list_display = ["__str__", "instance", "created_at", "last_used_at", "state"]
    list_filter = ["instance", ("revoked_at", admin.EmptyFieldListFilter)]
    list_select_related = ["instance"]
    search_fields = ["name", "shown_prefix", "instance__name"]
    actions = ["revoke_selected"]
    readonly_fields = [
        "instance",
        "name",
        "shown_prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]

    def get_form(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        if obj is None:
            kwargs["form"] = NewSendKeyForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return self.readonly_fields if obj is not None else ["instance", "name"]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Revoked, not deleted: the record of which key existed stays.
        return False

    @admin.display(description="State")
    def state(self, obj: SendKey) -> str:
        return "active" if obj.is_active else "revoked"

    def save_model(self, request: HttpRequest, obj: SendKey, form: Any, change: bool) -> None:
        if change:
            return
        made, key = create_send_key(instance=obj.instance, name=obj.name)
        obj.pk, obj.key_hash, obj.shown_prefix = made.pk, made.key_hash, made.shown_prefix
        self.message_user(
            request,
            f"Send key for {obj.instance.name}: {key} (copy it now: it is not shown again).",
            messages.WARNING,
        )

    @admin.action(description="Revoke the selected send keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[SendKey]) -> None:
        count = sum(revoke_send_key(send_key=key) for key in queryset)
        self.message_user(request, f"Revoked {count} send key(s).")
