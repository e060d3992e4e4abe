"""REST API over tenants: /api/v1/instances/."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from instances.api_provisioning import ProvisioningActions
from instances.authentication import API_KEY_HEADER
from instances.models import InstanceConfig
from instances.serializers import InstanceConfigSerializer
from instances.services import set_default_instance


class ApiKeyScheme(OpenApiAuthenticationExtension):
    # Defining the class registers it with drf-spectacular; urls.py imports this module.
    target_class = "instances.authentication.ApiKeyAuthentication"
    name = "apiKeyAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": API_KEY_HEADER,
            "description": "The operator's key, OMNIHUB_API_KEY.",
        }


class SendKeyScheme(OpenApiAuthenticationExtension):
    target_class = "instances.authentication.SendKeyAuthentication"
    name = "sendKeyAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": API_KEY_HEADER,
            "description": "An instance's send key (omnihub_send_…): the send endpoint of "
            "its own instance only.",
        }

    def get_security_requirement(self, auto_schema: AutoSchema) -> dict[str, list[str]] | None:
        # Listed only where it is accepted: views using SendKeyPermission.
        from instances.permissions import SendKeyPermission

        accepted = any(
            isinstance(permission, SendKeyPermission)
            for permission in auto_schema.view.get_permissions()
        )
        return {self.name: []} if accepted else None


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


UNAUTHORIZED = OpenApiResponse(
    ErrorSerializer, description="No valid API key, staff user's token or staff session."
)
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No instance with this name.")
INVALID = OpenApiResponse(
    {
        "type": "object",
        "additionalProperties": {
            "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]
        },
    },
    description="Messages by field name ('non_field_errors' for the instance as a whole, "
    "'detail' for an unreadable body).",
)
PAGE_NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such page.")
ERRORS = {401: UNAUTHORIZED, 404: NOT_FOUND}


@extend_schema(tags=["instances"])
@extend_schema_view(
    list=extend_schema(
        responses={200: InstanceConfigSerializer, 401: UNAUTHORIZED, 404: PAGE_NOT_FOUND}
    ),
    create=extend_schema(
        responses={201: InstanceConfigSerializer, 400: INVALID, 401: UNAUTHORIZED}
    ),
    retrieve=extend_schema(responses={200: InstanceConfigSerializer, **ERRORS}),
    update=extend_schema(responses={200: InstanceConfigSerializer, 400: INVALID, **ERRORS}),
    partial_update=extend_schema(responses={200: InstanceConfigSerializer, 400: INVALID, **ERRORS}),
    destroy=extend_schema(responses={204: None, **ERRORS}),
)
class InstanceViewSet(ProvisioningActions, viewsets.ModelViewSet):
    # The connection state is in each item: one join, not a query per row.
    queryset = InstanceConfig.objects.select_related("connection")
    serializer_class = InstanceConfigSerializer
    lookup_field = "name"
    lookup_value_regex = r"[A-Za-z0-9_-]{1,64}"
    # For staff users (instances/permissions.py); the CRUD actions need the model's own.
    action_permissions = {
        "set_default": ["instances.change_instanceconfig"],
        "connection_status": ["instances.view_instanceconfig"],
        # A diagnostic: it sends the stored keys only to the stored URLs.
        "connection_test": ["instances.view_instanceconfig"],
        "provision": ["instances.provision_instance"],
        # Whoever scans the QR code links their phone to the tenant's number.
        "qr": ["instances.provision_instance"],
    }

    @extend_schema(
        request=None,
        responses={200: InstanceConfigSerializer, **ERRORS},
        description="Make this instance the default one (it answers /webhook/evolution); "
        "the previous default stops being it.",
    )
    @action(detail=True, methods=["post"], url_path="set-default")
    def set_default(self, request: Request, **kwargs: Any) -> Response:
        instance = set_default_instance(name=self.get_object().name)
        return Response(self.get_serializer(instance).data)
