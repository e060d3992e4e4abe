"""The admin asks for the same permissions as the REST API: provisioning and the QR
code need instances.provision_instance, retrying messages webhooks.retry_message."""

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from instances.models import InstanceConfig
from tests.webhooks.test_admin_messages import add_message, retry
from webhooks.models import Status

CHANGELIST = "/admin/instances/instanceconfig/"


@pytest.fixture
def staff_with(client: Client, django_user_model):
    def make(*codenames: str) -> Client:
        user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
        user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
        client.force_login(user)
        return client

    return make


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


PROVISIONING_PAGES = ["provision/", "qr/", "qr/status/"]


@pytest.mark.parametrize("suffix", PROVISIONING_PAGES)
def test_an_editor_without_the_provision_permission_gets_403(staff_with, acme, suffix):
    client = staff_with("view_instanceconfig", "change_instanceconfig")

    assert client.get(f"{CHANGELIST}{acme.pk}/{suffix}").status_code == 403


def test_the_change_page_offers_provisioning_only_with_the_permission(staff_with, acme):
    client = staff_with("view_instanceconfig", "change_instanceconfig")
    page = client.get(f"{CHANGELIST}{acme.pk}/change/").content.decode()
    assert "Test connections" in page
    assert "Provision on Evolution" not in page
    assert "QR code" not in page


def test_the_provision_permission_opens_the_provision_page(staff_with, acme):
    client = staff_with("view_instanceconfig", "provision_instance")

    assert client.get(f"{CHANGELIST}{acme.pk}/provision/").status_code == 200
    page = client.get(f"{CHANGELIST}{acme.pk}/change/").content.decode()
    assert "Provision on Evolution" in page


def test_the_provision_action_needs_the_provision_permission(staff_with, acme):
    client = staff_with("view_instanceconfig", "change_instanceconfig")

    actions = client.get(CHANGELIST).context["action_form"].fields["action"].choices

    assert "provision_selected" not in dict(actions)


def test_retrying_messages_needs_the_retry_permission(staff_with, acme):
    failed = add_message(acme, status=Status.FAILED, last_error="Agent answered 500")
    client = staff_with("view_inboundmessage", "change_inboundmessage")

    retry(client, failed)

    failed.refresh_from_db()
    assert failed.status == Status.FAILED


def test_the_retry_permission_retries_messages_in_the_admin(staff_with, acme):
    failed = add_message(acme, status=Status.FAILED, last_error="Agent answered 500")
    client = staff_with("view_inboundmessage", "retry_message")

    retry(client, failed)

    failed.refresh_from_db()
    assert failed.status == Status.QUEUED
