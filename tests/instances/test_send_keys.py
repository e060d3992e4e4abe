"""Send keys: made and revoked over the tenant API, the admin and the CLI; stored
hashed; a key may send through its own instance only (SendKeyPermission) and gets
403 from every tenant endpoint."""

import hashlib
import json
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from instances.models import SEND_KEY_PREFIX, InstanceConfig, SendKey
from instances.permissions import SendKeyPermission
from instances.send_keys import create_send_key

pytestmark = pytest.mark.django_db

KEYS = "/api/v1/instances/acme/send-keys/"


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance(name="acme")


@pytest.fixture
def globex(make_instance) -> InstanceConfig:
    return make_instance(
        name="globex",
        evolution_url="https://evolution.globex.test",
        agent_api_url="https://agent.globex.test",
    )


@pytest.fixture
def acme_key(acme) -> str:
    return create_send_key(instance=acme, name="crm")[1]


def with_key(key: str) -> dict[str, str]:
    return {"HTTP_X_API_KEY": key}


class FakeSendView(APIView):
    """Stands for the outbox's send view: POST /api/v1/instances/{name}/messages/."""

    permission_classes = [SendKeyPermission]

    def post(self, request: Request, name: str) -> Response:
        return Response({"sent_by": str(request.user)}, status=202)

    def get(self, request: Request, name: str) -> Response:
        return Response({})


def call_send_view(method: str, *, instance: str, headers: dict[str, str]) -> Response:
    factory = APIRequestFactory()
    path = f"/api/v1/instances/{instance}/messages/"
    request = getattr(factory, method)(path, {"text": "hi"}, format="json", **headers)
    response = FakeSendView.as_view()(request, name=instance)
    response.render()
    return response


def test_creating_a_key_answers_it_once_and_stores_only_its_hash(client, acme, api_key_headers):
    response = client.post(
        KEYS, {"name": "crm"}, content_type="application/json", **api_key_headers
    )

    assert response.status_code == 201, response.content
    body = response.json()
    key = body["key"]
    assert key.startswith(SEND_KEY_PREFIX) and len(key) > len(SEND_KEY_PREFIX) + 40
    assert set(body) == {"id", "key", "name", "prefix", "created_at", "last_used_at"}
    row = SendKey.objects.get(pk=body["id"])
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {SendKey._meta.db_table}")
        assert not any(key in str(value) for value in cursor.fetchone())
    listed = client.get(KEYS, **api_key_headers).json()["results"]
    assert [item["id"] for item in listed] == [body["id"]]
    assert "key" not in listed[0] and key not in json.dumps(listed)


def test_the_send_view_accepts_a_key_of_its_own_instance(acme, acme_key):
    response = call_send_view("post", instance="acme", headers=with_key(acme_key))

    assert response.status_code == 202, response.content
    assert response.data["sent_by"].startswith("send-key:")
    assert SendKey.objects.get().last_used_at is not None


def test_the_send_view_refuses_a_key_of_another_instance(acme, globex, acme_key):
    response = call_send_view("post", instance="globex", headers=with_key(acme_key))

    assert response.status_code == 403
    assert "another instance" in response.data["detail"]


def test_the_send_view_refuses_a_send_key_on_another_method(acme, acme_key):
    assert call_send_view("get", instance="acme", headers=with_key(acme_key)).status_code == 403


def test_the_send_view_still_takes_the_operator_s_key(acme, api_key_headers):
    assert call_send_view("post", instance="acme", headers=api_key_headers).status_code == 202


def test_a_revoked_or_unknown_send_key_is_refused_with_401(client, acme, acme_key, api_key_headers):
    key_id = SendKey.objects.get().pk
    assert client.delete(f"{KEYS}{key_id}/", **api_key_headers).status_code == 204

    for key in (acme_key, SEND_KEY_PREFIX + "not-a-key"):
        response = call_send_view("post", instance="acme", headers=with_key(key))
        assert response.status_code == 401, key
    assert SendKey.objects.get().revoked_at is not None
    assert client.get(KEYS, **api_key_headers).json()["results"] == []
    assert client.delete(f"{KEYS}{key_id}/", **api_key_headers).status_code == 404


TENANT_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("get", "/api/v1/instances/", None),
    ("get", "/api/v1/instances/acme/", None),
    ("patch", "/api/v1/instances/acme/", {"default_agent": "x"}),
    ("delete", "/api/v1/instances/acme/", None),
    ("post", "/api/v1/instances/acme/provision/", None),
    ("get", "/api/v1/instances/acme/agents/", None),
    ("get", "/api/v1/instances/acme/routes/", None),
    ("get", KEYS, None),
    ("post", KEYS, {"name": "another"}),
    ("get", "/api/v1/messages/", None),
    ("get", "/api/v1/conversations/", None),
]


@pytest.mark.parametrize(("method", "path", "body"), TENANT_CALLS)
def test_a_send_key_gets_403_from_every_tenant_endpoint(client, acme, acme_key, method, path, body):
    before = acme.default_agent
    kwargs: dict[str, Any] = with_key(acme_key)
    if body is not None:
        kwargs.update(data=body, content_type="application/json")
    response = getattr(client, method)(path, **kwargs)

    assert response.status_code == 403, (path, response.content)
    assert "send key" in response.json()["detail"]
    assert SendKey.objects.count() == 1
    assert InstanceConfig.objects.get(name="acme").default_agent == before


def test_a_send_key_cannot_revoke_keys(client, acme, acme_key):
    key_id = SendKey.objects.get().pk

    assert client.delete(f"{KEYS}{key_id}/", **with_key(acme_key)).status_code == 403
    assert SendKey.objects.get().revoked_at is None


def test_staff_need_the_send_key_model_permissions(client, django_user_model, acme):
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {Token.objects.create(user=user).key}"

    refused = client.post(KEYS, {}, content_type="application/json")
    assert refused.status_code == 403
    assert "instances.add_sendkey" in refused.json()["detail"]

    user.user_permissions.add(Permission.objects.get(codename="add_sendkey"))
    assert client.post(KEYS, {}, content_type="application/json").status_code == 201


def test_keys_of_an_unknown_instance_answer_404(client, api_key_headers, db):
    response = client.post(
        "/api/v1/instances/nope/send-keys/", {}, content_type="application/json", **api_key_headers
    )
    assert response.status_code == 404


# --- the CLI ---------------------------------------------------------------------
def run(*args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("send_keys", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_the_cli_creates_lists_and_revokes_a_key_printing_it_once(acme):
    code, out, _ = run("create", "acme", "--name", "crm")
    assert code == 0
    key = next(line for line in out.splitlines() if line.startswith(SEND_KEY_PREFIX))
    key_id = SendKey.objects.get().pk

    code, listed, _ = run("list", "acme")
    assert code == 0 and "crm" in listed and key not in listed
    assert key[: len(SEND_KEY_PREFIX) + 4] in listed

    assert run("revoke", "acme", str(key_id))[0] == 0
    assert "no send keys" in run("list", "acme")[1]
    assert "revoked" in run("list", "acme", "--all")[1]
    assert json.loads(run("list", "acme", "--all", "--json")[1])[0]["revoked_at"]


def test_the_cli_says_when_there_is_no_such_instance_or_key(acme):
    assert run("create", "nope")[2].startswith("error: no instance named 'nope'")
    code, _, err = run("revoke", "acme", "99")
    assert code == 1 and "no send key 99" in err


# --- the admin -------------------------------------------------------------------
def test_the_admin_makes_a_key_showing_it_once_and_revokes_it(admin_client, acme):
    response = admin_client.post(
        "/admin/instances/sendkey/add/", {"instance": acme.pk, "name": "crm"}, follow=True
    )

    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    key = shown[0].split(": ", 1)[1].split(" ")[0]
    assert key.startswith(SEND_KEY_PREFIX)
    send_key = SendKey.objects.get()
    assert send_key.matches(key)
    page = admin_client.get(f"/admin/instances/sendkey/{send_key.pk}/change/").content.decode()
    assert key not in page

    admin_client.post(
        "/admin/instances/sendkey/",
        {"action": "revoke_selected", "_selected_action": [send_key.pk]},
    )
    send_key.refresh_from_db()
    assert not send_key.is_active
