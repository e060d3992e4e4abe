"""REST actions that set a tenant up on Evolution: status, provision, QR code, test.

Status codes: 200 when Evolution answered; 409 when the instance has no
Evolution URL and key (the legacy default); 502 when Evolution failed (refused,
timed out, or answered an error: the reason is in `detail`). The connection
test is a diagnostic: it answers 200 with `ok: false` and the failing steps.
"""

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from instances import provisioning
from instances.models import InstanceConfig

BAD_GATEWAY = 502
CONFLICT = 409


class StepSerializer(serializers.Serializer):
    name = serializers.CharField()
    ok = serializers.BooleanField()
    outcome = serializers.CharField(
        help_text="created, exists, set, unchanged, reachable, open, connecting, close, "
        "bad_key, claimed (the webhook delivers to another tenant: see `force`), failed, "
        "not_configured, no_model (an openai server without the instance's model) or "
        "not_checked (a webhook agent: a test does not call it)."
    )
    message = serializers.CharField()


class ConnectionTestSerializer(serializers.Serializer):
    ok = serializers.BooleanField(
        help_text="No step failed: Evolution and the agent server answer (a webhook agent "
        "is not called)."
    )
    detail = serializers.CharField()
    state = serializers.CharField(
        allow_null=True, help_text="The WhatsApp session's state, when Evolution answered."
    )
    steps = StepSerializer(many=True)


class ProvisionSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    detail = serializers.CharField()
    steps = StepSerializer(many=True)


class ConnectionUpdateSerializer(serializers.Serializer):
    state = serializers.CharField()
    updated_at = serializers.DateTimeField()


class StatusSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    detail = serializers.CharField(source="message")
    state = serializers.CharField(
        allow_null=True, help_text="Live from Evolution: open, connecting or close."
    )
    connected = serializers.BooleanField()
    last_connection_update = ConnectionUpdateSerializer(
        allow_null=True, help_text="The last connection.update Evolution delivered to the hub."
    )
    last_message_at = serializers.DateTimeField(
        allow_null=True, help_text="When the hub last received a message for this instance."
    )


class QrSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    detail = serializers.CharField(source="message")
    state = serializers.CharField(allow_null=True)
    connected = serializers.BooleanField()
    qr_code = serializers.CharField(
        allow_null=True,
        help_text="A data:image/png;base64 URL to show as an image; null when there is none "
        "yet (Evolution is still starting the session: ask again) or when connected.",
    )
    pairing_code = serializers.CharField(allow_null=True)


class FailureSerializer(serializers.Serializer):
    ok = serializers.BooleanField(help_text="Always false.")
    detail = serializers.CharField(help_text="What failed, e.g. Evolution's error message.")


class DetailSerializer(serializers.Serializer):
    detail = serializers.CharField()


FAILURES = {
    401: OpenApiResponse(
        DetailSerializer, description="No valid API key, staff user's token or staff session."
    ),
    404: OpenApiResponse(DetailSerializer, description="No instance with this name."),
    409: OpenApiResponse(
        FailureSerializer,
        description="The instance has no Evolution URL and key (the legacy default instance).",
    ),
    502: OpenApiResponse(
        FailureSerializer,
        description="Evolution failed: unreachable, timed out, or answered an error "
        "(wrong key, unknown instance, license required...).",
    ),
}


def failure_status(*, ok: bool, configured: bool) -> int:
    if ok:
        return 200
    return BAD_GATEWAY if configured else CONFLICT


# Mixed into InstanceViewSet: /api/v1/instances/{name}/status|provision|qr|test/.
# No docstring: drf-spectacular would take it as every operation's description.
class ProvisioningActions:
    get_object: Any

    @extend_schema(
        responses={200: StatusSerializer, **FAILURES},
        description="The WhatsApp session's state, asked of Evolution now, with what the hub "
        "last saw (connection update, message).",
    )
    @action(detail=True, methods=["get"], url_path="status", url_name="status")
    def connection_status(self, request: Request, **kwargs: Any) -> Response:
        instance: InstanceConfig = self.get_object()
        report = provisioning.connection_state(instance=instance)
        if not report.ok:
            return Response(
                {"ok": False, "detail": report.message},
                status=failure_status(ok=False, configured=report.configured),
            )
        connection = provisioning.stored_connection(instance)
        data = StatusSerializer(
            {
                "ok": True,
                "message": report.message,
                "state": report.state,
                "connected": report.connected,
                "last_connection_update": connection if connection and connection.state else None,
                "last_message_at": provisioning.last_message_at(instance),
            }
        ).data
        return Response(data)

    @extend_schema(
        request=None,
        parameters=[
            OpenApiParameter(
                "force",
                OpenApiTypes.BOOL,
                description="Take the Evolution instance's webhook over even when it delivers "
                "to another tenant of this hub (otherwise that step fails, outcome `claimed`).",
            )
        ],
        responses={
            200: ProvisionSerializer,
            401: FAILURES[401],
            404: FAILURES[404],
            409: OpenApiResponse(ProvisionSerializer, description=FAILURES[409].description),
            502: OpenApiResponse(
                ProvisionSerializer,
                description=f"{FAILURES[502].description} `steps` show what was done "
                "before the failing call.",
            ),
        },
        description="Create the instance on Evolution unless it exists, then set its webhook "
        "to this hub (MESSAGES_UPSERT and CONNECTION_UPDATE, with the X-Webhook-Token header) "
        "unless it is set so already. Safe to repeat.",
    )
    @action(detail=True, methods=["post"])
    def provision(self, request: Request, **kwargs: Any) -> Response:
        force = request.query_params.get("force", "").lower() in ("1", "true", "yes")
        report = provisioning.provision(instance=self.get_object(), force=force)
        return Response(
            ProvisionSerializer(report).data,
            status=failure_status(ok=report.ok, configured=report.configured),
        )

    @extend_schema(
        responses={200: QrSerializer, **FAILURES},
        description="The QR code that links a phone to the instance, and the pairing code "
        "when Evolution gives one. Poll it (every few seconds) until `connected` is true.",
    )
    @action(detail=True, methods=["get"])
    def qr(self, request: Request, **kwargs: Any) -> Response:
        report = provisioning.fetch_qr(instance=self.get_object())
        if not report.ok:
            return Response(
                {"ok": False, "detail": report.message},
                status=failure_status(ok=False, configured=report.configured),
            )
        return Response(QrSerializer(report).data)

    @extend_schema(
        request=None,
        responses={
            200: OpenApiResponse(
                ConnectionTestSerializer,
                description="The test ran; `ok` says whether everything answers, `steps` why not.",
            ),
            401: FAILURES[401],
            404: FAILURES[404],
        },
        description="Check that Evolution (connection state of the instance) and the agent "
        "server answer, without running the agent: automagik GET {agent_api_url}/health with "
        "the key; openai GET {agent_api_url}/models with the Bearer key, and the model "
        "(default_agent) must be listed; webhook is not called (its workflow would run): "
        "the step says `not_checked`.",
    )
    @action(detail=True, methods=["post"], url_path="test")
    def connection_test(self, request: Request, **kwargs: Any) -> Response:
        report = provisioning.test_connections(instance=self.get_object())
        return Response(ConnectionTestSerializer(report).data)
