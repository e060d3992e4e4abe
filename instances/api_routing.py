"""REST API over an instance's other agents and its routing rules:
/api/v1/instances/{instance_name}/agents/ (by name) and .../routes/ (by id)."""

from functools import cached_property
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import viewsets

from instances.api import INVALID, UNAUTHORIZED, ErrorSerializer
from instances.models import Agent, InstanceConfig, Route
from instances.serializers import AgentSerializer, RouteSerializer, as_api_error
from instances.services import delete_agent

INSTANCE = OpenApiParameter(
    "instance_name", OpenApiTypes.STR, OpenApiParameter.PATH, description="The instance's name."
)
NAME_RE = r"[A-Za-z0-9_-]{1,64}"


def crud_schema(serializer: type, *, what: str, extra_delete: dict[int, Any] | None = None) -> Any:
    missing = OpenApiResponse(ErrorSerializer, description=f"No such instance or {what}.")
    errors = {401: UNAUTHORIZED, 404: missing}
    return extend_schema_view(
        list=extend_schema(
            responses={
                200: serializer,
                401: UNAUTHORIZED,
                404: OpenApiResponse(ErrorSerializer, description="No such instance or page."),
            }
        ),
        create=extend_schema(responses={201: serializer, 400: INVALID, **errors}),
        retrieve=extend_schema(responses={200: serializer, **errors}),
        update=extend_schema(responses={200: serializer, 400: INVALID, **errors}),
        partial_update=extend_schema(responses={200: serializer, 400: INVALID, **errors}),
        destroy=extend_schema(responses={204: None, **errors, **(extra_delete or {})}),
    )


class InstanceChildren(viewsets.ModelViewSet):
    """Rows of one instance, named by the URL; the same auth as the instances."""

    @cached_property
    def tenant(self) -> InstanceConfig:
        return get_object_or_404(InstanceConfig, name=self.kwargs["instance_name"])

    def get_queryset(self) -> QuerySet[Any]:
        return super().get_queryset().filter(instance=self.tenant)

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        if "instance_name" in self.kwargs:  # not when the schema is generated
            context["instance"] = self.tenant
        return context


IN_USE = OpenApiResponse(INVALID.response, description="Routing rules point at the agent.")


@extend_schema(tags=["routing"], parameters=[INSTANCE])
@crud_schema(AgentSerializer, what="agent", extra_delete={400: IN_USE})
class AgentViewSet(InstanceChildren):
    queryset = Agent.objects.all()
    serializer_class = AgentSerializer
    lookup_field = "name"
    lookup_value_regex = NAME_RE

    def perform_destroy(self, instance: Agent) -> None:
        try:
            delete_agent(agent=instance)
        except DjangoValidationError as exc:
            raise as_api_error(exc) from exc


@extend_schema(tags=["routing"], parameters=[INSTANCE])
@crud_schema(RouteSerializer, what="rule")
class RouteViewSet(InstanceChildren):
    queryset = Route.objects.select_related("agent")
    serializer_class = RouteSerializer
    lookup_value_regex = r"[0-9]{1,18}"
