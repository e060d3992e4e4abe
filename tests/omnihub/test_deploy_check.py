"""`manage.py check --deploy` passes with the production settings the README documents,
and the defaults keep plain http working for `make run`."""

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.test import Client

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- production-settings"
PLACEHOLDER = "..."


def documented_production_settings() -> dict[str, str]:
    """The KEY=value lines of the README's production block, secrets made up."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(MARKER) + r".*?```sh\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md lost its production-settings block"
    settings: dict[str, str] = {}
    for line in block.group(1).splitlines():
        key, _, value = line.partition("#")[0].strip().partition("=")
        if key and value == PLACEHOLDER:
            # A made-up secret of the shape each one takes.
            made_up = Fernet.generate_key().decode() if "ENCRYPTION" in key else None
            settings[key] = made_up or secrets.token_urlsafe(50)
        elif key:
            settings[key] = value
    return settings


def test_the_readme_documents_the_https_settings():
    assert {
        "SECURE_SSL_REDIRECT",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_HSTS_SECONDS",
        "TRUST_X_FORWARDED_PROTO",
    } <= set(documented_production_settings())


def test_check_deploy_passes_with_the_documented_production_settings(tmp_path):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENV_FILE": "",
        "DJANGO_SETTINGS_MODULE": "omnihub.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        **documented_production_settings(),
    }

    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.django_db
def test_the_default_settings_serve_plain_http(client: Client):
    # `make run` serves http://127.0.0.1:8000 with the defaults: no redirect, no HSTS.
    response = client.get("/admin/login/")

    assert response.status_code == 200
    assert "Strict-Transport-Security" not in response


@pytest.mark.django_db
def test_with_ssl_redirect_the_webhook_health_and_metrics_are_not_redirected(
    client: Client, settings
):
    settings.SECURE_SSL_REDIRECT = True

    assert client.get("/admin/login/").status_code == 301
    assert (
        client.post("/webhook/evolution/nobody", "{}", content_type="application/json").status_code
        == 404
    )
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
