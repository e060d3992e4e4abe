"""REST API over conversations: /api/v1/conversations/ (read, pause, resume, reset)."""

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from instances.api import INVALID, PAGE_NOT_FOUND, UNAUTHORIZED, ErrorSerializer
from webhooks.api import BAD_FILTER, MessagePagination
from webhooks.models import Conversation
from webhooks.selectors import filter_conversations
from webhooks.serializers import (
    ConversationDetailSerializer,
    ConversationFilterSerializer,
    ConversationSerializer,
    PauseSerializer,
)
from webhooks.transitions import pause_conversation, reset_conversation, resume_conversation

NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No conversation with this id.")
ACTION_RESPONSES = {200: ConversationSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND}


@extend_schema(tags=["conversations"])
@extend_schema_view(
    list=extend_schema(
        parameters=[ConversationFilterSerializer],
        responses={
            200: ConversationSerializer,
            400: BAD_FILTER,
            401: UNAUTHORIZED,
            404: PAGE_NOT_FOUND,
        },
        description="The chats of every instance, most recent first.",
    ),
    retrieve=extend_schema(
        responses={200: ConversationDetailSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND},
        description="One chat with its latest messages in order, each with the reply sent.",
    ),
)
class ConversationViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    queryset = Conversation.objects.select_related("instance", "bound_agent")
    pagination_class = MessagePagination
    lookup_value_regex = r"[0-9]+"
    # instances/permissions.py: a staff user needs this for the actions.
    action_permissions = {
        name: ["webhooks.manage_conversation"] for name in ("pause", "resume", "reset")
    }

    def get_serializer_class(self) -> type[BaseSerializer]:
        if self.action == "retrieve":
            return ConversationDetailSerializer
        if self.action == "pause":
            return PauseSerializer
        return ConversationSerializer

    def get_queryset(self) -> QuerySet[Conversation]:
        queryset = super().get_queryset()
        if self.action != "list":
            return queryset
        filters = ConversationFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return filter_conversations(queryset, filters.validated_data)

    @extend_schema(
        request=PauseSerializer,
        responses={**ACTION_RESPONSES, 400: INVALID},
        description="Pause the bot in this chat, for `minutes` or until resumed.",
    )
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, **kwargs: Any) -> Response:
        conversation = self.get_object()
        body = PauseSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        pause_conversation(conversation=conversation, minutes=body.validated_data.get("minutes"))
        return Response(ConversationSerializer(conversation).data)

    @extend_schema(request=None, responses=ACTION_RESPONSES, description="Answer again at once.")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, **kwargs: Any) -> Response:
        conversation = resume_conversation(conversation=self.get_object())
        return Response(ConversationSerializer(conversation).data)

    @extend_schema(
        request=None,
        responses=ACTION_RESPONSES,
        description="Start a new agent session: the next message goes to an empty memory.",
    )
    @action(detail=True, methods=["post"])
    def reset(self, request: Request, **kwargs: Any) -> Response:
        conversation = reset_conversation(conversation=self.get_object())
        return Response(ConversationSerializer(conversation).data)
