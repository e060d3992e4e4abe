"""REST API over an instance's send keys: /api/v1/instances/{instance_name}/send-keys/.

Made and revoked by the tenant API's callers (the operator's key, staff with the
model's permissions); a send key itself gets 403 here, as on every tenant endpoint.
"""

from functools import cached_property
from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from instances.api import INVALID, UNAUTHORIZED, ErrorSerializer
from instances.api_routing import INSTANCE
from instances.models import InstanceConfig, SendKey
from instances.send_keys import create_send_key, revoke_send_key


class SendKeySerializer(serializers.ModelSerializer):
    prefix = serializers.CharField(
        source="shown_prefix", read_only=True, help_text="The key's first characters."
    )

    class Meta:
        model = SendKey
        fields = ["id", "name", "prefix", "created_at", "last_used_at"]
        read_only_fields = ["created_at", "last_used_at"]


class NewSendKeySerializer(SendKeySerializer):
    key = serializers.CharField(
        read_only=True,
        help_text="The key, shown this once (only its hash is stored). Send it as header "
        "x-api-key.",
    )

    class Meta(SendKeySerializer.Meta):
        fields = ["id", "key", *SendKeySerializer.Meta.fields[1:]]


MISSING = OpenApiResponse(ErrorSerializer, description="No such instance or active key.")
FORBIDDEN = OpenApiResponse(
    ErrorSerializer, description="A send key, or a staff user without the permission."
)


@extend_schema(tags=["send keys"], parameters=[INSTANCE])
@extend_schema_view(
    list=extend_schema(
        description="The instance's active send keys (never the keys themselves).",
        responses={200: SendKeySerializer, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: MISSING},
    ),
    create=extend_schema(
        description="A new send key: it may send messages through this instance only "
        "(POST /api/v1/instances/{name}/messages/) and nothing else. The key is in this "
        "answer only.",
        request=SendKeySerializer,
        responses={
            201: NewSendKeySerializer,
            400: INVALID,
            401: UNAUTHORIZED,
            403: FORBIDDEN,
            404: MISSING,
        },
    ),
    destroy=extend_schema(
        description="Revoke the key: from now on it is refused (401).",
        responses={204: None, 401: UNAUTHORIZED, 403: FORBIDDEN, 404: MISSING},
    ),
)
class SendKeyViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    queryset = SendKey.objects.active()
    serializer_class = SendKeySerializer
    lookup_value_regex = r"[0-9]{1,18}"

    @cached_property
    def tenant(self) -> InstanceConfig:
        return get_object_or_404(InstanceConfig, name=self.kwargs["instance_name"])

    def get_queryset(self) -> QuerySet[SendKey]:
        return super().get_queryset().filter(instance=self.tenant)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = SendKeySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        send_key, key = create_send_key(
            instance=self.tenant, name=serializer.validated_data.get("name", "")
        )
        send_key.key = key  # type: ignore[attr-defined]
        return Response(NewSendKeySerializer(send_key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: SendKey) -> None:
        revoke_send_key(send_key=instance)
