"""An instance's agents and routing rules: the model's rules (the admin, the API and
the CLI show the same messages, tested with each of them)."""

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import RestrictedError
from django.test import override_settings

from instances.checks import secrets_problem
from instances.models import Agent, InstanceConfig, Route
from instances.services import rotate_secrets

pytestmark = pytest.mark.django_db

BAD_REGEX = "Not a valid regular expression: missing ), unterminated subpattern at position 7."


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


def agent(instance: InstanceConfig, **fields) -> Agent:
    values = {
        "name": "sales",
        "agent_api_url": "http://sales.acme.test",
        "agent_api_key": "sales-key",
        "default_agent": "sales_agent",
        **fields,
    }
    return Agent(instance=instance, **values)


def errors(obj) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as error:
        obj.full_clean()
    return error.value.message_dict


def test_it_refuses_a_bad_regex(acme) -> None:
    route = Route(instance=acme, match="regex", value="pedido (\\d+")

    assert errors(route) == {"value": [BAD_REGEX]}


def test_it_refuses_a_chat_rule_that_is_not_a_chat(acme) -> None:
    (message,) = errors(Route(instance=acme, match="chat", value="+55 11 9"))["value"]

    assert message.startswith("'+55 11 9' is not a chat; examples: 5511987654321, 5511*")


def test_it_refuses_a_blank_keyword(acme) -> None:
    assert errors(Route(instance=acme, match="keyword", value="   "))["value"] == [
        "Enter the text to match."
    ]


def test_it_refuses_an_agent_of_another_instance(acme, make_instance) -> None:
    other = agent(make_instance(name="globex"))
    other.save()

    assert "agent" in errors(Route(instance=acme, match="keyword", value="x", agent=other))


def test_an_agent_name_cannot_be_default_nor_start_with_a_digit(acme) -> None:
    assert "'default' is the instance's own agent" in errors(agent(acme, name="Default"))["name"][0]
    assert "starting with a letter" in errors(agent(acme, name="2nd"))["name"][0]


def test_an_agent_name_is_unique_per_instance(acme, make_instance) -> None:
    agent(acme).save()
    agent(make_instance(name="globex")).save()

    assert errors(agent(acme)) == {"__all__": ["The instance already has an agent of this name."]}


def test_an_agent_cannot_be_renamed(acme) -> None:
    sales = agent(acme)
    sales.save()
    sales.name = "sales2"

    assert "cannot be renamed" in errors(sales)["name"][0]


def test_an_automagik_agent_needs_a_key_the_others_do_not(acme) -> None:
    assert (
        "Required for the automagik kind"
        in errors(agent(acme, agent_api_key=""))["agent_api_key"][0]
    )
    agent(acme, agent_api_key="", agent_kind="openai").full_clean()


def test_an_agent_url_on_another_host_needs_its_key_again(acme) -> None:
    agent(acme).save()
    sales = Agent.objects.get(name="sales")
    sales.agent_api_url = "http://attacker.example"

    (message,) = errors(sales)["agent_api_key"]
    assert "give the Agent API key again" in message

    sales.agent_api_key = "sales-key"
    sales.full_clean()


def test_an_agent_key_is_encrypted_at_rest_and_rotated(make_instance) -> None:
    with override_settings(OMNIHUB_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]):
        agent(make_instance()).save()
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT agent_api_key FROM {Agent._meta.db_table}")
            (stored,) = cursor.fetchone()
        assert stored.startswith("enc1:") and "sales-key" not in stored
        assert Agent.objects.get().agent_api_key == "sales-key"
        # acme's three secrets and the agent's key.
        assert rotate_secrets().encrypted == 4


def test_an_agent_that_rules_point_at_is_not_deleted(acme) -> None:
    sales = agent(acme)
    sales.save()
    Route.objects.create(instance=acme, match="keyword", value="vendas", agent=sales)

    with pytest.raises(RestrictedError):
        sales.delete()


def test_rules_are_in_position_order_then_oldest_first(acme) -> None:
    second = Route.objects.create(instance=acme, position=2, match="keyword", value="b")
    first = Route.objects.create(instance=acme, position=1, match="keyword", value="a")
    also_second = Route.objects.create(instance=acme, position=2, match="keyword", value="c")

    assert list(acme.routes.all()) == [first, second, also_second]
    assert str(first) == "keyword 'a' -> default"


def test_an_instance_is_deleted_with_its_agents_and_rules(acme) -> None:
    sales = agent(acme)
    sales.save()
    Route.objects.create(instance=acme, match="keyword", value="vendas", agent=sales)

    acme.delete()

    assert not Agent.objects.exists() and not Route.objects.exists()


def test_an_agent_key_no_configured_key_opens_is_reported_at_start(make_instance) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(OMNIHUB_ENCRYPTION_KEYS=[old]):
        acme = make_instance(evolution_key="e", agent_api_key="a", webhook_token="")
        InstanceConfig.objects.filter(pk=acme.pk).update(evolution_key="", agent_api_key="")
        agent(acme).save()
    with override_settings(OMNIHUB_ENCRYPTION_KEYS=[new]):
        problem = secrets_problem()

    assert problem is not None and "(1 encrypted secret(s) stored)" in problem
