"""Staff users of the REST API get what their Django model permissions allow;
the operator's API key gets everything."""

from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from rest_framework.authtoken.models import Token

from instances.models import InstanceConfig
from tests.conftest import load_fixture
from webhooks.ingest import record_delivery
from webhooks.models import InboundMessage, Status

ACME = "/api/v1/instances/acme/"
NEW = {
    "name": "globex",
    "evolution_url": "https://evolution.globex.test",
    "evolution_key": "globex-evolution-key",
    "agent_api_url": "https://agent.globex.test",
    "agent_api_key": "globex-agent-key",
}
# (method, path, body, the permission it needs): every instance operation that
# changes something or reaches Evolution on the tenant's behalf.
CHANGES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("post", "/api/v1/instances/", NEW, "instances.add_instanceconfig"),
    (
        "put",
        ACME,
        {"name": "acme", "agent_api_url": "https://a.test", "agent_api_key": "new-key"},
        "instances.change_instanceconfig",
    ),
    ("patch", ACME, {"default_agent": "other"}, "instances.change_instanceconfig"),
    ("delete", ACME, None, "instances.delete_instanceconfig"),
    ("post", ACME + "set-default/", None, "instances.change_instanceconfig"),
    ("post", ACME + "provision/", None, "instances.provision_instance"),
    ("get", ACME + "qr/", None, "instances.provision_instance"),
]


def call(client: Client, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, body, content_type="application/json")


@pytest.fixture
def staff_with(django_user_model, client: Client):
    """A client authenticated by the token of a staff user holding exactly `perms`."""

    def make(*perms: str) -> Client:
        user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client.defaults["HTTP_AUTHORIZATION"] = f"Token {Token.objects.create(user=user).key}"
        return client

    return make


@pytest.fixture
def failed_message(acme) -> InboundMessage:
    record_delivery(instance=acme, body=load_fixture("messages-upsert-text.json"))
    message = InboundMessage.objects.get()
    InboundMessage.objects.filter(pk=message.pk).update(status=Status.FAILED, last_error="x")
    return message


def test_a_view_only_staff_user_can_list_and_retrieve(staff_with, acme, failed_message):
    client = staff_with("instances.view_instanceconfig", "webhooks.view_inboundmessage")

    assert client.get("/api/v1/instances/").status_code == 200
    assert client.get(ACME).json()["name"] == "acme"
    assert client.get("/api/v1/messages/").json()["count"] == 1
    assert client.get(f"/api/v1/messages/{failed_message.pk}/").status_code == 200


@pytest.mark.parametrize(("method", "path", "body", "perm"), CHANGES)
def test_a_view_only_staff_user_gets_403_naming_the_permission(
    staff_with, acme, method, path, body, perm
):
    client = staff_with("instances.view_instanceconfig")

    response = call(client, method, path, body)

    assert response.status_code == 403, response.content
    assert response.json() == {"detail": f"This operation needs the permission {perm}."}
    assert list(InstanceConfig.objects.values_list("name", "default_agent", "is_default")) == [
        ("acme", "acme_agent", False)
    ]


def test_a_view_only_staff_user_gets_403_on_retry(staff_with, failed_message):
    client = staff_with("webhooks.view_inboundmessage")

    response = client.post(f"/api/v1/messages/{failed_message.pk}/retry/")

    assert response.status_code == 403
    assert "webhooks.retry_message" in response.json()["detail"]
    assert InboundMessage.objects.get().status == Status.FAILED


def test_a_staff_user_without_the_view_permission_cannot_list(staff_with, acme):
    client = staff_with("instances.add_instanceconfig")

    assert client.get("/api/v1/instances/").status_code == 403
    assert client.get("/api/v1/messages/").status_code == 403


@pytest.mark.parametrize(("method", "path", "body", "perm"), CHANGES)
def test_each_operation_works_with_its_own_permission(
    staff_with, acme, evolution, method, path, body, perm
):
    # Known to Evolution and linked, so that qr answers 200 too.
    evolution.instances[acme.whatsapp_instance] = {"state": "open", "webhook": None, "connects": 0}
    client = staff_with(perm)

    response = call(client, method, path, body)

    assert response.status_code in (200, 201, 204), response.content


def test_the_retry_permission_retries(staff_with, failed_message):
    client = staff_with("webhooks.retry_message")

    assert client.post(f"/api/v1/messages/{failed_message.pk}/retry/").status_code == 200
    assert InboundMessage.objects.get().status == Status.QUEUED


def test_a_staff_session_gets_the_same_answers(client, django_user_model, acme):
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_instanceconfig"))
    client.force_login(user)

    assert client.get(ACME).status_code == 200
    assert call(client, "patch", ACME, {"default_agent": "other"}).status_code == 403


class UndeclaredActionView:
    action = "archive"
    action_permissions: dict[str, list[str]] = {}
    queryset = InstanceConfig.objects.all()


def test_an_action_that_declares_no_permission_is_refused_to_staff_users():
    from instances.permissions import required_permissions

    assert required_permissions(view=UndeclaredActionView()) is None


def test_the_schema_documents_each_operations_403_and_its_permission(client, db):
    paths = client.get("/api/schema/?format=json").json()["paths"]

    provision = paths["/api/v1/instances/{name}/provision/"]["post"]["responses"]["403"]
    retry = paths["/api/v1/messages/{id}/retry/"]["post"]["responses"]["403"]
    listing = paths["/api/v1/instances/"]["get"]["responses"]["403"]
    assert "instances.provision_instance" in provision["description"]
    assert "webhooks.retry_message" in retry["description"]
    assert "instances.view_instanceconfig" in listing["description"]


class PlainView:
    """An APIView (not a viewset): its actions are the HTTP methods."""

    action_permissions = {"post": ["webhooks.manage_conversation"]}

    def __init__(self, method: str) -> None:
        self.request = type("Request", (), {"method": method})()


def test_a_plain_view_declares_its_permissions_by_http_method():
    from instances.permissions import required_permissions

    assert required_permissions(view=PlainView("POST")) == ["webhooks.manage_conversation"]
    assert required_permissions(view=PlainView("GET")) is None


def test_a_method_the_endpoint_lacks_answers_405_not_403(staff_with, failed_message):
    client = staff_with("webhooks.view_inboundmessage")

    assert client.put(f"/api/v1/messages/{failed_message.pk}/").status_code == 405
