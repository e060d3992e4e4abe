"""An instance's other agents and its routing rules, inline on the instance's page."""

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from instances.forms import KEEP_HELP, SecretField
from instances.models import AGENT_FIELDS, Agent, InstanceConfig, Route
from instances.services import agent_in_use


class AgentInlineForm(forms.ModelForm):
    """The key is write-only, as the instance's: empty keeps the stored one."""

    class Meta:
        model = Agent
        fields = ["name", *AGENT_FIELDS]
        field_classes = {"agent_api_key": SecretField}
        widgets = {"system_prompt": forms.Textarea(attrs={"rows": 2, "cols": 30})}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.fields["agent_api_key"].required = False
            self.fields["agent_api_key"].help_text = KEEP_HELP
            # Its name is in its chats' session names (the model refuses a rename).
            self.fields["name"].disabled = True

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.instance.pk is not None and not cleaned.get("agent_api_key"):
            # Left out, the stored key is not assigned: the model then knows it
            # was not given again (a new URL host needs it).
            cleaned.pop("agent_api_key", None)
        if cleaned.get("DELETE") and self.instance.pk is not None:
            refusal = agent_in_use(agent=self.instance)
            if refusal:
                raise forms.ValidationError(refusal)
        return cleaned


class AgentInline(admin.StackedInline):
    model = Agent
    form = AgentInlineForm
    extra = 0
    verbose_name = "other agent"
    verbose_name_plural = (
        "Other agents (the agent fields above are the default agent; routing rules choose these)"
    )


class RouteInline(admin.TabularInline):
    model = Route
    fields = ["position", "match", "value", "agent"]
    extra = 0
    ordering = ["position", "id"]
    verbose_name = "routing rule"
    verbose_name_plural = (
        "Routing rules (tried by position, lowest first; the first that matches a message "
        "answers it and keeps the chat until a reset or an idle expiry)"
    )

    def get_formset(
        self, request: HttpRequest, obj: InstanceConfig | None = None, **kwargs: Any
    ) -> Any:
        formset = super().get_formset(request, obj, **kwargs)
        # A form class built for this request: its choices are this instance's agents.
        field = formset.form.base_fields["agent"]
        field.queryset = (
            Agent.objects.filter(instance=obj) if obj is not None else Agent.objects.none()
        )
        field.empty_label = "default (the instance's own agent)"
        return formset
