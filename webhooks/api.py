"""REST API over the message log: /api/v1/messages/ (read-only, plus retry)."""

from typing import Any

from django.db.models import Q, QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from instances.api import PAGE_NOT_FOUND, UNAUTHORIZED, ErrorSerializer
from webhooks.models import InboundMessage
from webhooks.serializers import (
    MessageDetailSerializer,
    MessageFilterSerializer,
    MessageSerializer,
)
from webhooks.services import retry_messages, retry_problem

# Media can make these megabytes each; the list does not return them.
HEAVY_FIELDS = ("payload", "content", "agent_request", "agent_response")

MESSAGE_NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No message with this id.")
BAD_FILTER = OpenApiResponse(
    {
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "string"}},
    },
    description="Messages by query parameter name.",
)
NOT_RETRYABLE = OpenApiResponse(
    ErrorSerializer, description="The message is not failed (or cannot be sent again)."
)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class MessagePagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


def filter_messages(
    queryset: QuerySet[InboundMessage], params: dict[str, Any]
) -> QuerySet[InboundMessage]:
    if "instance" in params:
        queryset = queryset.filter(instance__name=params["instance"])
    if "status" in params:
        queryset = queryset.filter(status=params["status"])
    if "received_after" in params:
        queryset = queryset.filter(received_at__gte=params["received_after"])
    if "received_before" in params:
        queryset = queryset.filter(received_at__lt=params["received_before"])
    if params.get("search"):
        term = params["search"]
        queryset = queryset.filter(
            Q(phone__icontains=term)
            | Q(push_name__icontains=term)
            | Q(text__icontains=term)
            | Q(message_id=term)
        )
    return queryset


@extend_schema(tags=["messages"])
@extend_schema_view(
    list=extend_schema(
        parameters=[MessageFilterSerializer],
        responses={200: MessageSerializer, 400: BAD_FILTER, 401: UNAUTHORIZED, 404: PAGE_NOT_FOUND},
        description="The message log, newest first.",
    ),
    retrieve=extend_schema(
        responses={200: MessageDetailSerializer, 401: UNAUTHORIZED, 404: MESSAGE_NOT_FOUND},
        description="One message, with the agent's request and response and the delivery "
        "as received (without its apikey).",
    ),
)
class MessageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = InboundMessage.objects.select_related("instance").defer("reply_api_key")
    pagination_class = MessagePagination
    lookup_value_regex = r"[0-9]+"
    # For staff users (instances/permissions.py); list and retrieve need view_inboundmessage.
    action_permissions = {"retry": ["webhooks.retry_message"]}

    def get_serializer_class(self) -> type[BaseSerializer]:
        if self.action == "list":
            return MessageSerializer
        return MessageDetailSerializer

    def get_queryset(self) -> QuerySet[InboundMessage]:
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        filters = MessageFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return filter_messages(queryset.defer(*HEAVY_FIELDS), filters.validated_data)

    @extend_schema(
        request=None,
        responses={
            200: MessageDetailSerializer,
            401: UNAUTHORIZED,
            404: MESSAGE_NOT_FOUND,
            409: NOT_RETRYABLE,
        },
        description="Put a failed message back in the queue. A reply the agent already "
        "gave is kept, so only the send is retried; without one the agent is asked again.",
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, **kwargs: Any) -> Response:
        message = self.get_object()
        if not retry_messages(queryset_or_ids=[message.pk]):
            message.refresh_from_db()
            raise Conflict(retry_problem(message=message) or "The message could not be retried.")
        message.refresh_from_db()
        return Response(self.get_serializer(message).data)
