import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from instances.models import InstanceConfig

ROOT = Path(__file__).resolve().parents[2]
EVOLUTION_KEY = "evo-secret-1234"
AGENT_KEY = "agent-secret-5678"
HOOK_TOKEN = "hook-secret-9012"
SECRETS = (EVOLUTION_KEY, AGENT_KEY, HOOK_TOKEN, "acme-evolution-key", "acme-agent-key")
CREATE = [
    "create",
    "--name",
    "shop",
    "--evolution-url",
    "http://evolution.shop.test",
    "--evolution-key",
    EVOLUTION_KEY,
    "--agent-api-url",
    "http://agent.shop.test",
    "--agent-api-key",
    AGENT_KEY,
]


def run(*args: str) -> tuple[int, str, str]:
    """`manage.py instances ARGS` in-process: (exit code, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("instances", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def assert_no_secret(*outputs: str, allowed: str = "") -> None:
    for output in outputs:
        for secret in SECRETS:
            if secret != allowed:
                assert secret not in output


@pytest.fixture
def answer(monkeypatch):
    """Answer the confirmation prompt with the given text; returns the prompts seen."""
    prompts: list[str] = []

    def set_answer(text: str) -> list[str]:
        def prompt(message: str) -> str:
            prompts.append(message)
            return text

        # typer.confirm runs on typer's own copy of click.
        monkeypatch.setattr("typer._click.termui.visible_prompt_func", prompt)
        return prompts

    return set_answer


# --- create --------------------------------------------------------------------


def test_create_saves_the_instance_and_prints_the_generated_token_once(db):
    code, out, err = run(*CREATE, "--agent-timeout", "30", "--default-agent", "shop_bot")

    assert code == 0
    instance = InstanceConfig.objects.get(name="shop")
    assert (instance.evolution_key, instance.agent_api_key) == (EVOLUTION_KEY, AGENT_KEY)
    assert (instance.agent_timeout, instance.default_agent) == (30, "shop_bot")
    assert len(instance.webhook_token) >= 32
    assert "Created instance 'shop'." in out
    assert instance.webhook_url in out
    assert f"shown only this once, store it now): {instance.webhook_token}" in out
    assert_no_secret(out, err)
    assert err == ""


def test_create_with_json_prints_only_json_with_the_generated_token(db):
    code, out, _ = run(*CREATE, "--json")

    assert code == 0
    data = json.loads(out)
    instance = InstanceConfig.objects.get(name="shop")
    assert data["webhook_token"] == instance.webhook_token
    assert data["webhook_url"] == instance.webhook_url
    assert data["has_evolution_key"] is True
    assert data["has_agent_api_key"] is True
    assert data["has_webhook_token"] is True
    assert "evolution_key" not in data and "agent_api_key" not in data
    assert_no_secret(out)


def test_create_with_a_given_token_stores_it_without_printing_it(db):
    code, out, err = run(*CREATE, "--webhook-token", HOOK_TOKEN)

    assert code == 0
    assert InstanceConfig.objects.get(name="shop").webhook_token == HOOK_TOKEN
    assert "shown only this once" not in out
    assert_no_secret(out, err)


def test_create_with_json_and_a_given_token_does_not_echo_it(db):
    code, out, _ = run(*CREATE, "--webhook-token", HOOK_TOKEN, "--json")

    assert code == 0
    assert "webhook_token" not in json.loads(out)
    assert_no_secret(out)


def test_create_with_no_webhook_token_warns_of_unauthenticated_deliveries(db):
    code, out, err = run(*CREATE, "--no-webhook-token")

    assert code == 0
    assert InstanceConfig.objects.get(name="shop").webhook_token == ""
    assert "shown only this once" not in out
    assert "accepts unauthenticated deliveries" in err


def test_create_refuses_both_token_options_and_saves_nothing(db):
    code, _, err = run(*CREATE, "--webhook-token", HOOK_TOKEN, "--no-webhook-token")

    assert code == 1
    assert "either --webhook-token or --no-webhook-token" in err
    assert not InstanceConfig.objects.exists()


def test_create_can_make_the_new_instance_the_default(make_instance):
    make_instance(name="old", is_default=True)

    code, _, _ = run(*CREATE, "--default", "--inactive")

    assert code == 0
    shop = InstanceConfig.objects.get(name="shop")
    assert shop.is_default and not shop.is_active
    assert not InstanceConfig.objects.get(name="old").is_default


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--name", "messages-upsert"], "error: name: 'messages-upsert' is an Evolution event"),
        (["--name", "bad name"], "error: name: Use 1 to 64 characters"),
        (["--evolution-url", "evolution.shop.test"], "error: evolution_url: Enter an http://"),
        (["--agent-api-url", "ftp://agent.test"], "error: agent_api_url: Enter an http://"),
        (["--agent-timeout", "soon"], "error: agent_timeout: “soon” value must be an integer."),
        (["--agent-timeout", "0"], "error: agent_timeout: Ensure this value is greater"),
        (["--agent-timeout", "601"], "error: agent_timeout: Ensure this value is less"),
        (["--evolution-key", ""], "error: evolution_key: Required unless"),
        (["--webhook-token", "has space"], "error: webhook_token: Use printable ASCII"),
    ],
)
def test_create_reports_bad_input_in_the_models_words_and_saves_nothing(db, extra, expected):
    # Later options win in click, so `extra` overrides the valid values of CREATE.
    code, out, err = run(*CREATE, *extra)

    assert code == 1
    assert expected in err
    assert "Traceback" not in err
    assert out == ""
    assert not InstanceConfig.objects.exists()
    assert_no_secret(err)


def test_create_refuses_a_duplicate_name(make_instance):
    make_instance(name="shop")

    code, _, err = run(*CREATE)

    assert code == 1
    assert "error: name: Instance with this Name already exists." in err
    assert InstanceConfig.objects.count() == 1


def test_create_requires_a_name(db):
    with pytest.raises(CommandError, match="name"):
        call_command("instances", "create", stdout=StringIO(), stderr=StringIO())
    assert not InstanceConfig.objects.exists()


# --- list and show -----------------------------------------------------------------


def test_list_prints_a_table_without_secrets(make_instance):
    make_instance(name="acme", is_default=True)
    make_instance(name="zeta", whatsapp_instance="", webhook_token="", is_active=False)

    code, out, err = run("list")

    assert code == 0
    header, _, acme, zeta = out.splitlines()
    assert header.startswith("NAME  WHATSAPP INSTANCE  AGENT")
    assert header.split()[-4:] == ["DEFAULT", "ACTIVE", "TOKEN", "UPDATED"]
    assert acme.split()[:6] == ["acme", "acme-wa", "acme_agent", "yes", "yes", "yes"]
    assert zeta.split()[:6] == ["zeta", "-", "acme_agent", "no", "no", "no"]
    assert_no_secret(out, err)


def test_list_says_when_there_are_no_instances(db):
    assert run("list") == (0, "No instances.\n", "")


def test_list_with_json_prints_every_instance_without_secrets(make_instance):
    make_instance(name="acme")
    make_instance(name="zeta", webhook_token="")

    code, out, _ = run("list", "--json")

    assert code == 0
    data = json.loads(out)
    assert [i["name"] for i in data] == ["acme", "zeta"]
    assert [i["has_webhook_token"] for i in data] == [True, False]
    assert data[0]["webhook_url"].endswith("/webhook/evolution/acme")
    assert_no_secret(out)


def test_show_prints_one_field_a_line_with_secrets_as_set_or_not(make_instance):
    instance = make_instance(agent_timeout=42)

    code, out, err = run("show", "acme")

    assert code == 0
    lines = [line.split(":", 1) for line in out.splitlines()]
    fields = {label: value.strip() for label, value in lines}
    assert fields["evolution key"] == "set"
    assert fields["agent api key"] == "set"
    assert fields["webhook token"] == "set"
    assert fields["agent timeout"] == "42s"
    assert fields["webhook url"] == instance.webhook_url
    assert "WARNING" not in out + err
    assert_no_secret(out, err)
    assert instance.webhook_token not in out


def test_show_warns_when_the_instance_has_no_webhook_token(make_instance):
    make_instance(webhook_token="")

    code, out, _ = run("show", "acme")

    assert code == 0
    assert "webhook token:       not set" in out
    assert "WARNING: instance 'acme' has no webhook token" in out


def test_show_with_json_prints_only_json_and_warns_on_stderr(make_instance):
    instance = make_instance(webhook_token="", is_default=True)

    code, out, err = run("show", "acme", "--json")

    assert code == 0
    data = json.loads(out)
    assert data["name"] == "acme"
    assert data["is_default"] is True
    assert data["has_webhook_token"] is False
    assert data["webhook_url"] == instance.webhook_url
    assert not {"evolution_key", "agent_api_key", "webhook_token"} & data.keys()
    assert "unauthenticated deliveries" in err
    assert_no_secret(out, err)


@pytest.mark.parametrize(
    "args",
    [
        ["show", "nope"],
        ["show", "nope", "--json"],
        ["update", "nope", "--default-agent", "x"],
        ["delete", "nope", "--yes"],
        ["set-default", "nope"],
    ],
)
def test_an_unknown_name_is_a_clear_error(db, args):
    code, out, err = run(*args)

    assert code == 1
    assert out == ""
    assert err == "error: no instance named 'nope' (see `manage.py instances list`).\n"


# --- update --------------------------------------------------------------------------


def test_update_changes_only_the_given_fields_and_names_them(make_instance):
    instance = make_instance()

    code, out, err = run(
        "update", "acme", "--agent-timeout", "30", "--agent-api-key", AGENT_KEY, "--inactive"
    )

    assert code == 0
    assert out == "Updated instance 'acme': is_active, agent_api_key, agent_timeout.\n"
    instance.refresh_from_db()
    assert (instance.agent_timeout, instance.agent_api_key) == (30, AGENT_KEY)
    assert not instance.is_active
    assert instance.evolution_key == "acme-evolution-key"
    assert instance.default_agent == "acme_agent"
    assert_no_secret(out, err)


def test_update_with_the_same_values_changes_nothing(make_instance):
    instance = make_instance(agent_timeout=60)

    code, out, _ = run("update", "acme", "--agent-timeout", "60", "--default-agent", "acme_agent")

    assert code == 0
    assert out == "Instance 'acme' unchanged.\n"
    assert InstanceConfig.objects.get().updated_at == instance.updated_at


def test_update_refuses_a_rename_with_the_models_message(make_instance):
    make_instance()

    code, _, err = run("update", "acme", "--name", "other")

    assert code == 1
    assert "error: name: An instance cannot be renamed" in err
    assert InstanceConfig.objects.get().name == "acme"


def test_update_with_bad_input_saves_nothing(make_instance):
    make_instance()

    code, _, err = run("update", "acme", "--default-agent", "new", "--agent-api-url", "not a url")

    assert code == 1
    assert "error: agent_api_url:" in err
    assert "Traceback" not in err
    assert InstanceConfig.objects.get().default_agent == "acme_agent"


def test_update_sets_and_blanks_the_webhook_token_without_printing_it(make_instance):
    make_instance()

    code, out, err = run("update", "acme", "--webhook-token", HOOK_TOKEN)
    assert code == 0
    assert out == "Updated instance 'acme': webhook_token.\n"
    assert InstanceConfig.objects.get().webhook_token == HOOK_TOKEN
    assert_no_secret(out, err)

    code, out, err = run("update", "acme", "--no-webhook-token")
    assert code == 0
    assert InstanceConfig.objects.get().webhook_token == ""
    assert "accepts unauthenticated deliveries" in err


def test_update_with_json_prints_the_instance_without_secrets(make_instance):
    make_instance()

    code, out, _ = run("update", "acme", "--default-agent", "bot", "--json")

    assert code == 0
    data = json.loads(out)
    assert data["default_agent"] == "bot"
    assert "webhook_token" not in data
    assert data["has_webhook_token"] is True
    assert_no_secret(out)


def test_update_can_make_an_instance_the_default(make_instance):
    make_instance(name="old", is_default=True)
    make_instance(name="new")

    code, _, _ = run("update", "new", "--default")

    assert code == 0
    assert InstanceConfig.objects.get(is_default=True).name == "new"


# --- delete --------------------------------------------------------------------------


def test_delete_with_yes_deletes_without_asking(make_instance, answer):
    make_instance()
    prompts = answer("n")

    code, out, _ = run("delete", "acme", "--yes")

    assert code == 0
    assert out == "Deleted instance 'acme'.\n"
    assert prompts == []
    assert not InstanceConfig.objects.exists()


def test_delete_asks_and_deletes_when_confirmed(make_instance, answer, capsys):
    make_instance()
    prompts = answer("y")

    code, _, _ = run("delete", "acme")

    assert code == 0
    assert len(prompts) == 1
    assert "Delete instance 'acme' and its stored messages?" in capsys.readouterr().err
    assert not InstanceConfig.objects.exists()


@pytest.mark.parametrize("reply", ["n", ""])
def test_delete_aborts_and_deletes_nothing_when_not_confirmed(make_instance, answer, reply):
    make_instance()
    answer(reply)

    code, out, err = run("delete", "acme")

    assert code == 1
    assert out == ""
    assert err == "Aborted: nothing deleted.\n"
    assert InstanceConfig.objects.filter(name="acme").exists()


# --- set-default ----------------------------------------------------------------------


def test_set_default_moves_the_flag(make_instance):
    make_instance(name="old", is_default=True)
    make_instance(name="new")

    code, out, _ = run("set-default", "new")

    assert code == 0
    assert out == "Instance 'new' is now the default.\n"
    assert list(InstanceConfig.objects.filter(is_default=True).values_list("name", flat=True)) == [
        "new"
    ]


def test_set_default_says_when_it_already_is(make_instance):
    make_instance(is_default=True)

    assert run("set-default", "acme") == (0, "Instance 'acme' is already the default.\n", "")


def test_set_default_with_json_prints_the_instance(make_instance):
    make_instance()

    code, out, _ = run("set-default", "acme", "--json")

    assert code == 0
    data = json.loads(out)
    assert (data["name"], data["is_default"]) == ("acme", True)
    assert_no_secret(out)


# --- end to end, as an operator runs it ---------------------------------------------


def manage(db_url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"AGENT_API_KEY", "WEBHOOK_TOKEN", "DATABASE_URL"}
    }
    env.update(
        ENV_FILE="",
        SECRET_KEY="x",
        DJANGO_SETTINGS_MODULE="omnihub.test_settings",
        DATABASE_URL=db_url,
    )
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_line_exits_with_clear_codes_and_no_traceback(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    assert manage(db_url, "migrate", "--verbosity", "0").returncode == 0

    created = manage(db_url, "instances", *CREATE)
    assert created.returncode == 0, created.stderr
    token = created.stdout.split("store it now): ")[1].split()[0]

    steps = [
        (["instances", *CREATE], "", 1, "error: name: Instance with this Name already exists."),
        (["instances", "create", "--name", "x", "--agent-timeout", "abc"], "", 1, "integer"),
        (["instances", "show", "nope"], "", 1, "no instance named 'nope'"),
        (["instances", "delete", "shop"], "n\n", 1, "Aborted: nothing deleted."),
        (["instances", "delete", "shop"], "", 1, "Abort"),
        (["instances", "set-default", "shop"], "", 0, ""),
        (["instances", "delete", "shop", "--yes"], "", 0, ""),
    ]
    for args, stdin, code, message in steps:
        result = manage(db_url, *args, stdin=stdin)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert_no_secret(result.stdout, result.stderr)
        assert token not in result.stdout + result.stderr

    listing = manage(db_url, "instances", "list", "--json")
    assert json.loads(listing.stdout) == []


def test_provision_refuses_another_tenants_webhook_and_force_takes_it(make_instance):
    from django.conf import settings

    from tests.fakes import FakeEvolution

    evolution = FakeEvolution().start()
    try:
        make_instance(name="globex", evolution_url=evolution.url)
        make_instance(name="shop", evolution_url=evolution.url, whatsapp_instance="shop-wa")
        evolution.instances["shop-wa"] = {
            "state": "open",
            "connects": 0,
            "webhook": {
                "url": f"{settings.PUBLIC_BASE_URL}/webhook/evolution/globex",
                "enabled": True,
                "events": [],
            },
        }

        refused = run("provision", "shop")
        forced = run("provision", "shop", "--force")
    finally:
        evolution.stop()

    assert refused[0] == 1
    assert "Webhook: Claimed." in refused[2]
    assert "--force" in refused[2]
    assert forced[0] == 0, forced
    assert "taken over from tenant globex" in forced[1]
    assert evolution.instances["shop-wa"]["webhook"]["url"].endswith("/webhook/evolution/shop")


def test_legacy_mode_is_set_and_cleared_with_the_models_rules(make_instance):
    make_instance(
        name="default", legacy_mode=True, evolution_url="", evolution_key="", is_default=True
    )

    code, _, err = run("update", "default", "--no-legacy-mode")

    # The same words as the admin and the API: the model says them.
    assert code == 1
    assert "error: evolution_url: Required unless legacy mode is on" in err
    code, out, _ = run("update", "default", "--legacy-server-url", "https://evo.shop.test")
    assert code == 0
    assert InstanceConfig.objects.get(name="default").legacy_server_url == "https://evo.shop.test"
    _, out, _ = run("show", "default")
    assert "legacy mode:" in out and "https://evo.shop.test" in out
