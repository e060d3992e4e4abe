"""Tenant URLs never point the hub at cloud metadata or link-local addresses."""

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings

from instances.models import InstanceConfig
from tests.conftest import instance_fields

METADATA = [
    "http://169.254.169.254/latest/meta-data",
    "http://[fd00:ec2::254]",
    "http://metadata.google.internal/computeMetadata/v1",
    "http://METADATA.google.internal./",
    "http://100.100.100.200",
    # The same address as one number, in hex, and IPv4-mapped IPv6.
    "http://2852039166",
    "http://0xa9fea9fe",
    "http://[::ffff:169.254.169.254]",
]
LINK_LOCAL = ["http://169.254.10.1:8080", "http://[fe80::1]"]
PRIVATE = [
    "http://127.0.0.1:8080",
    "http://localhost:8080",
    "http://10.0.0.5",
    "http://172.16.3.4",
    "http://192.168.1.10",
    "http://100.64.0.1",
    "http://[fc00::1]",
    "http://[::1]",
    "http://0.0.0.0",
]


def url_errors(field: str, url: str) -> list[str]:
    instance = InstanceConfig(**instance_fields(**{field: url}))
    try:
        instance.full_clean()
    except ValidationError as exc:
        return exc.message_dict.get(field, [])
    return []


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["evolution_url", "agent_api_url"])
@pytest.mark.parametrize("url", METADATA)
def test_it_refuses_a_metadata_address(field, url):
    assert [e for e in url_errors(field, url) if "cloud metadata" in e and "never" in e]


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["evolution_url", "agent_api_url"])
@pytest.mark.parametrize("url", LINK_LOCAL)
def test_it_refuses_a_link_local_address(field, url):
    assert [e for e in url_errors(field, url) if "is a link-local address" in e]


@pytest.mark.django_db
@pytest.mark.parametrize("url", [*PRIVATE, "https://evolution.example.com"])
def test_it_accepts_private_addresses_by_default_for_self_hosting(url):
    assert url_errors("evolution_url", url) == []


@pytest.mark.django_db
@override_settings(OUTBOUND_ALLOW_PRIVATE=False)
@pytest.mark.parametrize("url", PRIVATE)
def test_with_private_addresses_off_it_refuses_them(url):
    [error] = url_errors("agent_api_url", url)

    assert "refused while OUTBOUND_ALLOW_PRIVATE is false" in error


@pytest.mark.django_db
@override_settings(OUTBOUND_ALLOW_PRIVATE=False)
def test_with_private_addresses_off_it_still_accepts_a_public_name():
    assert url_errors("agent_api_url", "https://agent.example.com") == []


@pytest.mark.django_db
def test_the_api_refuses_a_metadata_url_with_the_models_message(client, api_key_headers):
    body = instance_fields(agent_api_url="http://169.254.169.254/")

    response = client.post(
        "/api/v1/instances/", body, content_type="application/json", **api_key_headers
    )

    assert response.status_code == 400
    assert "169.254.169.254 is a cloud metadata address" in str(response.json())
