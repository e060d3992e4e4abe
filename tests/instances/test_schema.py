import re

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command

DETAIL = "/api/v1/instances/{name}/"


@pytest.fixture
def schema(client) -> dict:
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    return response.json()


def test_the_schema_describes_every_operation(schema):
    paths = schema["paths"]
    assert set(paths["/api/v1/instances/"]) == {"get", "post"}
    assert set(paths[DETAIL]) == {"get", "put", "patch", "delete"}
    assert set(paths["/api/v1/instances/{name}/set-default/"]) == {"post"}


def test_the_schema_documents_the_error_answers(schema):
    detail = schema["paths"][DETAIL]
    assert set(detail["put"]["responses"]) == {"200", "400", "401", "403", "404"}
    assert set(detail["delete"]["responses"]) == {"204", "401", "403", "404"}
    set_default = schema["paths"]["/api/v1/instances/{name}/set-default/"]["post"]
    assert set(set_default["responses"]) == {"200", "401", "403", "404"}
    assert "requestBody" not in set_default


def test_the_schema_never_returns_secrets(schema):
    components = schema["components"]["schemas"]
    returned = components["InstanceConfig"]["properties"]
    assert not {"evolution_key", "agent_api_key", "webhook_token"} & set(returned)
    assert {"has_evolution_key", "has_agent_api_key", "has_webhook_token"} <= set(returned)
    assert components["InstanceConfigRequest"]["properties"]["agent_api_key"]["writeOnly"]


def test_the_schema_declares_the_api_key_scheme(schema):
    scheme = schema["components"]["securitySchemes"]["apiKeyAuth"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "x-api-key"}
    operation = schema["paths"]["/api/v1/instances/"]["get"]
    assert {"apiKeyAuth": []} in operation["security"]


def test_swagger_ui_is_served_from_sidecar_static_files(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "/api/schema/" in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets)
    for asset in assets:
        # No CDN: the page must work on a host without internet access.
        assert asset.startswith("/static/drf_spectacular_sidecar/"), asset
        assert finders.find(asset.removeprefix("/static/")), asset


def test_the_schema_generates_without_warnings(tmp_path):
    # Warnings mean an undocumented part of the API (schemathesis relies on it).
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yml"))
    assert "/api/v1/instances/{name}/set-default/" in (tmp_path / "s.yml").read_text()
