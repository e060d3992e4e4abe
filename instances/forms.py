"""The admin's tenant form: secrets are write-only, validation stays in the model."""

from typing import Any

from django import forms

from instances.models import (
    CALLBACK_FIELDS,
    CONVERSATION_FIELDS,
    MEDIA_FIELDS,
    OUTBOUND_FIELDS,
    REPLY_FIELDS,
    SECRET_FIELDS,
    InstanceConfig,
    generate_webhook_token,
)

KEEP_HELP = "Leave empty to keep the current value."
TOKEN_HELP = "Deliveries must carry it as header X-Webhook-Token or ?token=."


class SecretInput(forms.PasswordInput):
    def __init__(self) -> None:
        # new-password stops browsers from filling in the operator's login password.
        super().__init__(render_value=False, attrs={"autocomplete": "new-password"})


class SecretField(forms.CharField):
    """A secret the page never shows; an empty submission means "no change"."""

    widget = SecretInput

    def __init__(self, **kwargs: Any) -> None:
        # The model field's callable default (webhook_token) would ask for a
        # hidden "initial-" input, which holds the stored value in clear.
        kwargs["show_hidden_initial"] = False
        # The admin passes its own text widget, which would print the value.
        kwargs["widget"] = SecretInput
        super().__init__(**kwargs)

    def has_changed(self, initial: Any, data: Any) -> bool:
        return bool(data) and super().has_changed(initial, data)


class InstanceConfigForm(forms.ModelForm):
    no_webhook_token = forms.BooleanField(
        label="Accept deliveries without a token",
        required=False,
        help_text="Clears the token: anyone who knows the webhook URL can post to it.",
    )
    regenerate_webhook_token = forms.BooleanField(
        label="Generate a new token",
        required=False,
        help_text="Replaces the token with a random one; update the webhook URL in "
        "Evolution afterwards.",
    )

    class Meta:
        model = InstanceConfig
        fields = [
            "name",
            "is_active",
            "is_default",
            "legacy_mode",
            "legacy_server_url",
            "evolution_url",
            "evolution_key",
            "whatsapp_instance",
            "agent_kind",
            "agent_api_url",
            "agent_api_key",
            "default_agent",
            "system_prompt",
            "history_limit",
            "agent_timeout",
            "session_id_prefix",
            "fallback_message",
            "webhook_token",
            *REPLY_FIELDS,
            *MEDIA_FIELDS,
            *CALLBACK_FIELDS,
            *OUTBOUND_FIELDS,
            *CONVERSATION_FIELDS,
        ]
        field_classes = dict.fromkeys(SECRET_FIELDS, SecretField)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.editing = self.instance.pk is not None
        # On create this is the model's random default, on edit the stored value.
        self.stored_secrets = {name: getattr(self.instance, name) for name in SECRET_FIELDS}
        if self.editing:
            for name in SECRET_FIELDS:
                if name in self.fields:
                    # The model decides what is required; an empty field keeps
                    # the stored value, so the form must accept it.
                    self.fields[name].required = False
                    self.fields[name].help_text = " ".join(
                        filter(None, [self.fields[name].help_text, KEEP_HELP])
                    )
            self.fields["no_webhook_token"].initial = not self.instance.webhook_token
        else:
            del self.fields["regenerate_webhook_token"]
        if "webhook_token" in self.fields:
            # The model's text says "blank accepts unauthenticated deliveries";
            # here that takes the explicit checkbox, and empty means keep/generate.
            self.fields["webhook_token"].help_text = (
                f"{TOKEN_HELP} {KEEP_HELP}"
                if self.editing
                else f"{TOKEN_HELP} Leave empty to generate a random one."
            )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        typed_token = cleaned.get("webhook_token")
        for name in SECRET_FIELDS:
            if name in self.fields and not self.has_error(name) and not cleaned.get(name):
                if self.editing and name != "webhook_token":
                    # Left out, the stored key is not assigned: the model then
                    # knows it was not given again (a new URL host needs it).
                    del cleaned[name]
                else:
                    cleaned[name] = self.stored_secrets[name]

        if "webhook_token" in self.fields and not self.has_error("webhook_token"):
            no_token = cleaned.get("no_webhook_token", False)
            regenerate = cleaned.get("regenerate_webhook_token", False)
            if no_token and (regenerate or typed_token):
                raise forms.ValidationError(
                    "Either set a token or accept deliveries without one, not both."
                )
            if no_token:
                cleaned["webhook_token"] = ""
            elif regenerate or not cleaned["webhook_token"]:
                # Unticking "without a token" on a token-less instance asks for one.
                cleaned["webhook_token"] = generate_webhook_token()
            # construct_instance() skips a field missing from the POST that has
            # a default, so set it here too.
            self.instance.webhook_token = cleaned["webhook_token"]
        return cleaned

    def _get_validation_exclusions(self) -> set[str]:
        # save_instance() takes the default flag from the other instance in the
        # same transaction, so the one-default constraint must not stop the form.
        return super()._get_validation_exclusions() | {"is_default"}
