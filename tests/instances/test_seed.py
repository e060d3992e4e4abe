import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from instances.models import InstanceConfig

ROOT = Path(__file__).resolve().parents[2]
LEGACY = {
    "AGENT_API_URL": "http://agent.legacy.test",
    "AGENT_API_KEY": "legacy-agent-secret",
    "DEFAULT_AGENT_NAME": "legacy_agent",
    "AGENT_API_TIMEOUT": 45,
    "WHATSAPP_INSTANCE": "legacy-wa",
    "SESSION_ID_PREFIX": "wa_",
    "EVOLUTION_API_URL": "http://evolution.legacy.test",
    "EVOLUTION_API_KEY": "legacy-evolution-secret",
    "WEBHOOK_TOKEN": "legacy-hook-secret",
}
SECRETS = ("legacy-agent-secret", "legacy-evolution-secret", "legacy-hook-secret", "new-secret")
NO_TOKEN_WARNING = "accepts unauthenticated deliveries; set WEBHOOK_TOKEN"


def seed(*args: str, **settings: object) -> tuple[int, str, str]:
    """`manage.py seed_default_instance ARGS` with LEGACY overridden by `settings`."""
    out, err = StringIO(), StringIO()
    with override_settings(**{**LEGACY, **settings}):
        try:
            call_command("seed_default_instance", *args, stdout=out, stderr=err)
        except CommandError as exc:
            return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def assert_no_secret(*outputs: str) -> None:
    for output in outputs:
        for secret in SECRETS:
            assert secret not in output


def test_it_creates_the_default_instance_from_the_legacy_variables(db):
    code, out, err = seed()

    assert code == 0
    assert (
        out
        == "Created default instance 'default' (agent legacy_agent at http://agent.legacy.test).\n"
    )
    assert err == ""
    instance = InstanceConfig.objects.get()
    assert instance.name == "default" and instance.is_default
    assert instance.agent_api_url == "http://agent.legacy.test"
    assert instance.agent_api_key == "legacy-agent-secret"
    assert instance.agent_timeout == 45
    assert (instance.whatsapp_instance, instance.session_id_prefix) == ("legacy-wa", "wa_")
    assert instance.evolution_url == "http://evolution.legacy.test"
    assert instance.evolution_key == "legacy-evolution-secret"
    assert instance.webhook_token == "legacy-hook-secret"
    assert_no_secret(out, err)


def test_a_second_run_changes_nothing(db):
    seed()
    first = InstanceConfig.objects.get()

    code, out, _ = seed()

    assert code == 0
    assert out == "Default instance 'default' unchanged.\n"
    assert InstanceConfig.objects.get().updated_at == first.updated_at


def test_without_update_it_keeps_the_existing_default_even_if_the_variables_changed(db):
    seed()

    code, out, _ = seed(DEFAULT_AGENT_NAME="other_agent")

    assert (code, out) == (0, "Default instance 'default' unchanged.\n")
    assert InstanceConfig.objects.get().default_agent == "legacy_agent"


def test_it_leaves_a_default_created_by_other_means_alone(make_instance):
    make_instance(name="acme", is_default=True)

    code, out, _ = seed()

    assert (code, out) == (0, "Default instance 'acme' unchanged.\n")
    assert list(InstanceConfig.objects.values_list("name", flat=True)) == ["acme"]


def test_update_rewrites_the_default_and_names_the_changed_fields(db):
    seed()

    code, out, _ = seed(
        "--update", AGENT_API_URL="http://agent2.legacy.test", DEFAULT_AGENT_NAME="bot"
    )

    assert code == 0
    assert out == "Updated default instance 'default': agent_api_url, default_agent.\n"
    instance = InstanceConfig.objects.get()
    assert (instance.agent_api_url, instance.default_agent) == ("http://agent2.legacy.test", "bot")

    code, out, _ = seed(
        "--update", AGENT_API_URL="http://agent2.legacy.test", DEFAULT_AGENT_NAME="bot"
    )
    assert (code, out) == (0, "Default instance 'default' unchanged.\n")


def test_update_names_a_changed_secret_but_never_prints_it(db):
    seed()

    code, out, err = seed("--update", AGENT_API_KEY="new-secret")

    assert code == 0
    assert out == "Updated default instance 'default': agent_api_key.\n"
    assert InstanceConfig.objects.get().agent_api_key == "new-secret"
    assert_no_secret(out, err)


def test_a_missing_agent_api_key_is_a_clear_error(db):
    code, out, err = seed(AGENT_API_KEY="")

    assert code == 1
    assert out == ""
    assert err.startswith("error: AGENT_API_KEY is not set")
    assert len(err.splitlines()) == 1
    assert not InstanceConfig.objects.exists()


def test_a_bad_variable_is_reported_with_its_name_and_nothing_is_saved(db):
    code, out, err = seed(AGENT_API_URL="agent.legacy.test")

    assert code == 1
    assert out == ""
    assert "error: agent_api_url (AGENT_API_URL): Enter an http://" in err
    assert not InstanceConfig.objects.exists()
    assert_no_secret(err)


def test_a_non_default_instance_named_default_is_a_clear_error(make_instance):
    make_instance(name="default")

    code, _, err = seed()

    assert code == 1
    assert "error: name: Instance with this Name already exists." in err
    assert not InstanceConfig.objects.filter(is_default=True).exists()


def test_without_webhook_token_it_warns_of_unauthenticated_deliveries(db):
    code, out, err = seed(WEBHOOK_TOKEN="")

    assert code == 0
    assert out.startswith("Created default instance 'default'")
    assert InstanceConfig.objects.get().webhook_token == ""
    assert NO_TOKEN_WARNING in err
    assert len(err.splitlines()) == 1


def test_with_webhook_token_it_does_not_warn(db):
    code, _, err = seed()

    assert code == 0
    assert err == ""


def test_update_with_an_unset_webhook_token_keeps_the_stored_token(db):
    seed()

    code, out, err = seed("--update", WEBHOOK_TOKEN="")

    assert code == 0
    assert out == "Default instance 'default' unchanged.\n"
    assert InstanceConfig.objects.get(name="default").webhook_token
    assert_no_secret(out, err)


@pytest.fixture
def manage(tmp_path):
    """Run manage.py in a subprocess on a fresh, migrated SQLite database."""
    env = {k: v for k, v in os.environ.items() if k not in LEGACY and k != "DATABASE_URL"}
    env.update(
        ENV_FILE="",
        SECRET_KEY="x",
        DJANGO_SETTINGS_MODULE="omnihub.test_settings",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )

    def run(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env={**env, **variables},
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert run("migrate", "--verbosity", "0").returncode == 0
    return run


def test_the_command_line_seeds_once_and_fails_cleanly_without_a_key(manage):
    missing = manage("seed_default_instance")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.startswith("error: AGENT_API_KEY is not set")
    assert "Traceback" not in missing.stderr

    created = manage("seed_default_instance", AGENT_API_KEY="legacy-agent-secret")
    assert created.returncode == 0
    assert created.stdout.startswith("Created default instance 'default'")
    assert NO_TOKEN_WARNING in created.stderr

    again = manage(
        "seed_default_instance", AGENT_API_KEY="legacy-agent-secret", WEBHOOK_TOKEN="t0k3n"
    )
    assert (again.returncode, again.stdout) == (0, "Default instance 'default' unchanged.\n")

    updated = manage(
        "seed_default_instance",
        "--update",
        AGENT_API_KEY="legacy-agent-secret",
        WEBHOOK_TOKEN="legacy-hook-secret",
    )
    assert updated.returncode == 0
    assert updated.stdout == "Updated default instance 'default': webhook_token.\n"
    assert updated.stderr == ""
    for result in (missing, created, again, updated):
        assert_no_secret(result.stdout, result.stderr)
