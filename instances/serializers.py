from datetime import datetime
from typing import Any

from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Field as ModelField
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.settings import api_settings

from instances import provisioning
from instances.models import (
    AGENT_FIELDS,
    CALLBACK_FIELDS,
    CONVERSATION_FIELDS,
    MEDIA_FIELDS,
    OUTBOUND_FIELDS,
    REPLY_FIELDS,
    SECRET_FIELDS,
    Agent,
    InstanceConfig,
    Route,
)
from instances.services import agent_named, save_agent, save_instance, save_route

SECRET_HELP = "Write-only. Omit it on update to keep the stored value."


def as_api_error(exc: DjangoValidationError) -> serializers.ValidationError:
    """The model's errors, keyed by field as in the admin."""
    detail = serializers.as_serializer_error(exc)
    if NON_FIELD_ERRORS in detail:
        detail[api_settings.NON_FIELD_ERRORS_KEY] = detail.pop(NON_FIELD_ERRORS)
    return serializers.ValidationError(detail)


@extend_schema_field(OpenApiTypes.BOOL)
class IsSetField(serializers.ReadOnlyField):
    """Whether the secret in `source` is set, so a client can check it without reading it."""

    def to_representation(self, value: str) -> bool:
        return bool(value)


class StringListField(serializers.ListField):
    """A list of strings whose errors read as one list of messages, as the model's do."""

    child = serializers.CharField(allow_blank=True, trim_whitespace=False)

    def to_internal_value(self, data: Any) -> list[str]:
        if isinstance(data, str) or not isinstance(data, list):
            raise serializers.ValidationError("Expected a list of strings.")
        if not all(isinstance(item, str) for item in data):
            raise serializers.ValidationError("Each item must be a string.")
        # The entries' own rules are the model's (instances/validators.py).
        return list(data)


class InstanceConfigSerializer(serializers.ModelSerializer):
    webhook_url = serializers.URLField(
        read_only=True, help_text="Where Evolution must post this instance's events."
    )
    has_evolution_key = IsSetField(source="evolution_key")
    has_webhook_token = IsSetField(source="webhook_token")
    has_agent_api_key = IsSetField(source="agent_api_key")
    has_stt_key = IsSetField(source="stt_key")
    has_callback_secret = IsSetField(source="callback_secret")
    bot_ids = StringListField(
        required=False,
        help_text=InstanceConfig._meta.get_field("bot_ids").help_text,
    )
    allow_list = StringListField(
        required=False,
        help_text=InstanceConfig._meta.get_field("allow_list").help_text,
    )
    block_list = StringListField(
        required=False,
        help_text=InstanceConfig._meta.get_field("block_list").help_text,
    )
    opt_out_keywords = StringListField(
        required=False,
        help_text=InstanceConfig._meta.get_field("opt_out_keywords").help_text,
    )
    connection_state = serializers.SerializerMethodField(
        help_text="The state in Evolution's last connection.update (open, connecting, "
        "close); null before the first one."
    )
    connection_updated_at = serializers.SerializerMethodField(
        help_text="When that connection.update arrived."
    )

    class Meta:
        model = InstanceConfig
        fields = [
            "name",
            "webhook_url",
            "is_active",
            "is_default",
            "legacy_mode",
            "legacy_server_url",
            "evolution_url",
            "evolution_key",
            "has_evolution_key",
            "whatsapp_instance",
            "webhook_token",
            "has_webhook_token",
            "agent_kind",
            "agent_api_url",
            "agent_api_key",
            "has_agent_api_key",
            "default_agent",
            "system_prompt",
            "history_limit",
            "agent_timeout",
            "session_id_prefix",
            "fallback_message",
            *REPLY_FIELDS,
            *MEDIA_FIELDS,
            "has_stt_key",
            *CALLBACK_FIELDS,
            "has_callback_secret",
            *OUTBOUND_FIELDS,
            *CONVERSATION_FIELDS,
            "connection_state",
            "connection_updated_at",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {
            "evolution_key": {"write_only": True, "help_text": SECRET_HELP},
            "agent_api_key": {"write_only": True, "help_text": SECRET_HELP},
            "stt_key": {"write_only": True, "help_text": SECRET_HELP},
            "callback_secret": {"write_only": True, "help_text": SECRET_HELP},
            "webhook_token": {
                "write_only": True,
                "help_text": "Write-only. Omitted on create: a random token is generated; "
                "blank accepts unauthenticated deliveries. Omit it on update to keep it.",
            },
        }

    def get_connection_state(self, instance: InstanceConfig) -> str | None:
        # The viewset's queryset selects the row with the instance: no query per item.
        connection = provisioning.stored_connection(instance)
        return connection.state if connection is not None and connection.state else None

    def get_connection_updated_at(self, instance: InstanceConfig) -> datetime | None:
        connection = provisioning.stored_connection(instance)
        return connection.updated_at if connection is not None and connection.state else None

    def build_standard_field(
        self, field_name: str, model_field: ModelField
    ) -> tuple[type[serializers.Field], dict[str, Any]]:
        field_class, kwargs = super().build_standard_field(field_name, model_field)
        # The model's validators (and name uniqueness) run in full_clean(), in
        # validate(): once, all errors together, with the admin's messages.
        kwargs.pop("validators", None)
        return field_class, kwargs

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if self.instance is not None:
            # Clients never read secrets back, so they cannot resend them on PUT.
            for name in SECRET_FIELDS:
                fields[name].required = False
        return fields

    def build_instance(self, attrs: dict[str, Any]) -> InstanceConfig:
        instance = self.instance if self.instance is not None else InstanceConfig()
        for key, value in attrs.items():
            setattr(instance, key, value)
        return instance

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            # save_instance() takes the flag from the old default before it
            # checks the one-default constraint, so don't check it here.
            self.build_instance(attrs).full_clean(exclude=["is_default"])
        except DjangoValidationError as exc:
            raise as_api_error(exc) from exc
        return attrs

    def save_built(self, attrs: dict[str, Any]) -> InstanceConfig:
        try:
            return save_instance(instance=self.build_instance(attrs))
        except DjangoValidationError as exc:  # e.g. a concurrent create of the same name
            raise as_api_error(exc) from exc

    def create(self, validated_data: dict[str, Any]) -> InstanceConfig:
        return self.save_built(validated_data)

    def update(self, instance: InstanceConfig, validated_data: dict[str, Any]) -> InstanceConfig:
        return self.save_built(validated_data)


# --- an instance's other agents and its routing rules (instances/api_routing.py) ----
class ModelCleanSerializer(serializers.ModelSerializer):
    """Validation is the model's full_clean(), with the admin's and the CLI's messages;
    the instance whose agents or rules these are comes from the URL (context)."""

    def build_standard_field(
        self, field_name: str, model_field: ModelField
    ) -> tuple[type[serializers.Field], dict[str, Any]]:
        field_class, kwargs = super().build_standard_field(field_name, model_field)
        # Run once, in full_clean(), with the other rules.
        kwargs.pop("validators", None)
        return field_class, kwargs

    @property
    def tenant(self) -> InstanceConfig:
        return self.context["instance"]

    def build(self, attrs: dict[str, Any]) -> Any:
        obj = self.instance if self.instance is not None else self.Meta.model(instance=self.tenant)
        for key, value in attrs.items():
            setattr(obj, key, value)
        return obj

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            self.build(attrs).full_clean()
        except DjangoValidationError as exc:
            raise as_api_error(exc) from exc
        return attrs


class AgentSerializer(ModelCleanSerializer):
    has_agent_api_key = IsSetField(source="agent_api_key")

    class Meta:
        model = Agent
        fields = ["name", *AGENT_FIELDS, "has_agent_api_key", "created_at", "updated_at"]
        extra_kwargs = {"agent_api_key": {"write_only": True, "help_text": SECRET_HELP}}

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        if self.instance is not None:
            # Clients never read the key back, so they cannot resend it on PUT.
            fields["agent_api_key"].required = False
        return fields

    def create(self, validated_data: dict[str, Any]) -> Agent:
        return save_agent(agent=self.build(validated_data))

    def update(self, instance: Agent, validated_data: dict[str, Any]) -> Agent:
        return save_agent(agent=self.build(validated_data))


class RouteSerializer(ModelCleanSerializer):
    agent = serializers.CharField(
        max_length=64,
        help_text="The name of one of the instance's agents (/agents/), or 'default': the "
        "instance's own agent.",
    )

    class Meta:
        model = Route
        fields = ["id", "position", "match", "value", "agent", "created_at"]
        extra_kwargs = {"position": {"required": False, "allow_null": True}}

    def to_representation(self, route: Route) -> dict[str, Any]:
        data = super().to_representation(route)
        data["agent"] = route.agent_name
        return data

    def validate_agent(self, name: str) -> Agent | None:
        try:
            return agent_named(instance=self.tenant, name=name)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict["agent"]) from exc

    def create(self, validated_data: dict[str, Any]) -> Route:
        return save_route(route=self.build(validated_data))

    def update(self, instance: Route, validated_data: dict[str, Any]) -> Route:
        return save_route(route=self.build(validated_data))
