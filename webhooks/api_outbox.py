"""The send API: /api/v1/instances/{instance_name}/messages/ (send, list, retrieve).

A send is queued in the instance's outbox (webhooks/outbox.py) and answered
202 at once; the dispatcher sends it at the instance's pace. The same
idempotency key for the same instance answers the same message (200) and
never sends twice; under a used key, a different body answers 409.
"""

from functools import cached_property
from typing import Any

from asgiref.sync import async_to_sync
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from instances.api import INVALID, UNAUTHORIZED, ErrorSerializer
from instances.models import InstanceConfig
from instances.permissions import SendPermission
from webhooks import outbox
from webhooks.api import BAD_FILTER, Conflict, MessagePagination
from webhooks.db import run_db
from webhooks.models import OutboundMessage
from webhooks.opt_out import OPTED_OUT_ERROR, opted_out
from webhooks.serializers_outbox import (
    OutboundFilterSerializer,
    OutboundMessageSerializer,
    SendRequestSerializer,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
INSTANCE = OpenApiParameter(
    "instance_name", OpenApiTypes.STR, OpenApiParameter.PATH, description="The instance's name."
)
KEY_HEADER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="The same as the body's idempotency_key (give one, or both alike).",
)
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such instance or message.")
KEY_REUSED = OpenApiResponse(
    ErrorSerializer,
    description="The idempotency key was used for another body, or the instance cannot "
    "send (legacy mode without an Evolution URL and key of its own).",
)


@extend_schema(tags=["send"], parameters=[INSTANCE])
@extend_schema_view(
    create=extend_schema(
        request=SendRequestSerializer,
        parameters=[KEY_HEADER],
        responses={
            202: OutboundMessageSerializer,
            200: OpenApiResponse(
                OutboundMessageSerializer,
                description="The idempotency key was used for this body: the same message.",
            ),
            400: INVALID,
            401: UNAUTHORIZED,
            404: NOT_FOUND,
            409: KEY_REUSED,
        },
        description="Queue a text or media message in the instance's outbox; it is sent "
        "at the instance's pace (send_interval_ms, daily_send_limit), not before send_at.",
    ),
    list=extend_schema(
        parameters=[OutboundFilterSerializer],
        responses={
            200: OutboundMessageSerializer,
            400: BAD_FILTER,
            401: UNAUTHORIZED,
            404: NOT_FOUND,
        },
        description="The instance's outbound messages (API, operator and replies), newest first.",
    ),
    retrieve=extend_schema(
        responses={200: OutboundMessageSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND},
        description="One outbound message: queued, sending, sent (with Evolution's key.id), "
        "delivered, read, or failed (with the error).",
    ),
)
class OutboundViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    queryset = OutboundMessage.objects.all()
    serializer_class = OutboundMessageSerializer
    pagination_class = MessagePagination
    permission_classes = [SendPermission]
    lookup_value_regex = r"[0-9]{1,18}"

    @cached_property
    def tenant(self) -> InstanceConfig:
        return get_object_or_404(InstanceConfig, name=self.kwargs["instance_name"])

    def get_queryset(self) -> QuerySet[OutboundMessage]:
        queryset = super().get_queryset().filter(instance=self.tenant)
        if self.action != "list":
            return queryset
        filters = OutboundFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        params = filters.validated_data
        if "status" in params:
            queryset = queryset.filter(status=params["status"])
        if "kind" in params:
            queryset = queryset.filter(kind=params["kind"])
        if "to" in params:
            queryset = queryset.filter(chat_jid=params["to"])
        if "created_after" in params:
            queryset = queryset.filter(created_at__gte=params["created_after"])
        if "created_before" in params:
            queryset = queryset.filter(created_at__lt=params["created_before"])
        return queryset

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        instance = self.tenant
        request_body = SendRequestSerializer(data=request.data)
        request_body.is_valid(raise_exception=True)
        data = dict(request_body.validated_data)
        key = idempotency_key(request=request, body_key=data.pop("idempotency_key", None))
        if instance.is_legacy and not (instance.evolution_url and instance.evolution_key):
            raise Conflict(
                "This instance has no Evolution URL and key of its own (legacy mode): "
                "it can only answer messages."
            )
        if opted_out(instance_id=instance.pk, phone=data["to"]):
            # The user sent an opt-out keyword (webhooks/opt_out.py): no API send
            # reaches them; their own messages are still answered.
            raise exceptions.ValidationError({"to": [OPTED_OUT_ERROR]})
        media = dict(data["media"]) if "media" in data else None
        text = data.get("text") or (media or {}).get("caption", "")
        send_at = data.get("send_at")
        body_hash = outbox.request_hash(
            {"to": data["to"], "text": data.get("text"), "media": media, "send_at": send_at}
        )
        # On the process's database thread, as the webhooks store deliveries: there
        # SQLite writers queue on a lock instead of sleeping in its busy handler
        # while the dispatchers write (42 -> ... API sends/s in bench/outbox.py).
        queued = async_to_sync(run_db)(
            outbox.queue_send,
            instance=instance,
            chat_jid=data["to"],
            text=text,
            media=media,
            send_at=send_at,
            idempotency_key=key,
            body_hash=body_hash,
        )
        if not queued.created and queued.message.request_hash != body_hash:
            raise Conflict(
                "This idempotency key was used for another request to this instance "
                f"(message {queued.message.pk})."
            )
        answer = status.HTTP_202_ACCEPTED if queued.created else status.HTTP_200_OK
        return Response(self.get_serializer(queued.message).data, status=answer)


def idempotency_key(*, request: Request, body_key: str | None) -> str:
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is not None:
        header = header.strip()
        if not header or len(header) > 128:
            raise exceptions.ValidationError({IDEMPOTENCY_HEADER: ["1 to 128 characters."]})
        if body_key is not None and body_key != header:
            raise exceptions.ValidationError(
                {"idempotency_key": ["Differs from the Idempotency-Key header."]}
            )
        return header
    return body_key or ""
