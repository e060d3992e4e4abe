"""`manage.py agents` and `manage.py routes`: the model's messages, keys never printed."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from instances.models import Agent, InstanceConfig, Route

pytestmark = pytest.mark.django_db

BAD_REGEX = "Not a valid regular expression: missing ), unterminated subpattern at position 7."
SALES = [
    "--name",
    "sales",
    "--agent-api-url",
    "http://sales.acme.test",
    "--agent-api-key",
    "sales-SECRET",
    "--default-agent",
    "sales_agent",
]


def run(command: str, *args: str) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command(command, *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


def test_an_agent_is_added_listed_and_its_key_never_printed(acme) -> None:
    code, out, err = run("agents", "add", "acme", *SALES)
    assert (code, out, err) == (0, "Added agent 'sales' to instance 'acme'.\n", "")

    code, out, _ = run("agents", "list", "acme")
    assert code == 0 and "sales" in out and "sales_agent" in out and "set" in out
    code, out, _ = run("agents", "list", "acme", "--json")
    [listed] = json.loads(out)
    assert listed["has_agent_api_key"] is True
    assert "sales-SECRET" not in out
    assert Agent.objects.get().agent_api_key == "sales-SECRET"


def test_an_agent_is_updated_and_its_url_on_another_host_needs_the_key(acme) -> None:
    run("agents", "add", "acme", *SALES)

    code, _, err = run("agents", "update", "acme", "sales", "--agent-api-url", "http://x.example")
    assert code == 1
    assert err.startswith("error: agent_api_key: The Agent API URL now points at another host")

    code, _, _ = run("agents", "update", "acme", "sales", "--agent-timeout", "90")
    assert code == 0 and Agent.objects.get().agent_timeout == 90


def test_a_bad_agent_value_gets_the_model_s_message(acme) -> None:
    code, _, err = run("agents", "add", "acme", *SALES, "--agent-timeout", "0")

    assert code == 1
    assert err == "error: agent_timeout: Ensure this value is greater than or equal to 1.\n"


def test_it_refuses_a_bad_regex(acme) -> None:
    code, _, err = run("routes", "add", "acme", "--match", "regex", "--value", "pedido (\\d+")

    assert (code, err) == (1, f"error: value: {BAD_REGEX}\n")
    assert not Route.objects.exists()


def test_rules_are_added_in_order_and_name_their_agent(acme) -> None:
    run("agents", "add", "acme", *SALES)

    code, out, _ = run(
        "routes", "add", "acme", "--match", "keyword", "--value", "vendas", "--agent", "sales"
    )
    assert code == 0 and "at position 1" in out
    run("routes", "add", "acme", "--match", "chat", "--value", "5511*")
    code, out, _ = run("routes", "list", "acme", "--json")

    assert [(r["position"], r["match"], r["value"], r["agent"]) for r in json.loads(out)] == [
        (1, "keyword", "vendas", "sales"),
        (2, "chat", "5511*", "default"),
    ]


def test_a_rule_to_an_unknown_agent_is_refused(acme) -> None:
    code, _, err = run(
        "routes", "add", "acme", "--match", "keyword", "--value", "x", "--agent", "bob"
    )

    assert code == 1
    assert (
        err
        == "error: agent: Instance 'acme' has no agent named 'bob' ('default' is its own agent).\n"
    )


def test_a_rule_is_moved_then_deleted(acme) -> None:
    run("routes", "add", "acme", "--match", "prefix", "--value", "/a")
    route = Route.objects.get()

    code, _, _ = run("routes", "update", "acme", str(route.pk), "--position", "7")
    assert code == 0 and Route.objects.get().position == 7
    code, _, err = run("routes", "update", "acme", str(route.pk), "--position", "x")
    assert code == 1 and err.startswith("error: position: ")

    assert run("routes", "delete", "acme", str(route.pk))[0] == 0
    assert not Route.objects.exists()


def test_an_agent_rules_point_at_is_not_deleted(acme) -> None:
    run("agents", "add", "acme", *SALES)
    run("routes", "add", "acme", "--match", "keyword", "--value", "x", "--agent", "sales")

    code, _, err = run("agents", "delete", "acme", "sales")

    assert code == 1
    assert "used by the routing rules at position 1" in err
    assert Agent.objects.exists()


def test_an_unknown_instance_is_an_error(db) -> None:
    code, _, err = run("routes", "list", "nobody")

    assert code == 1 and "no instance named 'nobody'" in err


def test_the_conversations_list_shows_the_bound_agent(acme) -> None:
    from webhooks.models import Conversation

    run("agents", "add", "acme", *SALES)
    Conversation.objects.create(
        instance=acme,
        chat_jid="5511987654321@s.whatsapp.net",
        phone="5511987654321",
        bound_agent=Agent.objects.get(),
    )

    code, out, _ = run("conversations", "list")

    assert code == 0
    header, _, row = out.splitlines()
    assert "AGENT" in header
    assert "sales" in row.split() and "acme_5511987654321-sales" in row.split()
