import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from instances.models import InstanceConfig


def test_it_generates_a_webhook_token_on_create(make_instance):
    assert len(make_instance().webhook_token) >= 32


def test_the_database_refuses_two_defaults(make_instance):
    make_instance(name="one", is_default=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        InstanceConfig.objects.create(
            name="two", is_default=True, agent_api_url="http://a.test", agent_api_key="k"
        )


def test_it_refuses_a_rename(make_instance):
    instance = make_instance()
    instance.name = "other"
    with pytest.raises(ValidationError) as info:
        instance.full_clean()
    assert "renamed" in str(info.value.message_dict["name"])


def claim(make_instance, **fields):
    """full_clean of a second tenant; the ValidationError's message for whatsapp_instance."""
    with pytest.raises(ValidationError) as info:
        make_instance(**fields)
    return " ".join(info.value.message_dict["whatsapp_instance"])


def test_two_tenants_cannot_claim_one_evolution_instance(make_instance):
    make_instance(name="acme", whatsapp_instance="shop-1")

    message = claim(make_instance, name="globex", whatsapp_instance="shop-1")

    assert 'Instance "acme" already uses the Evolution instance "shop-1"' in message
    assert not InstanceConfig.objects.filter(name="globex").exists()


def test_a_blank_whatsapp_instance_claims_the_tenants_own_name(make_instance):
    make_instance(name="shop", whatsapp_instance="")

    assert '"shop"' in claim(make_instance, name="globex", whatsapp_instance="shop")
    # And the other way round: a name taken as someone's whatsapp_instance.
    make_instance(name="other", whatsapp_instance="initech")
    assert '"other"' in claim(make_instance, name="initech", whatsapp_instance="")


def test_a_trailing_slash_or_the_hosts_case_is_the_same_server(make_instance):
    make_instance(name="acme", whatsapp_instance="shop-1", evolution_url="http://evo.test")

    claim(make_instance, name="globex", whatsapp_instance="shop-1", evolution_url="http://EVO.test/")


def test_one_evolution_instance_name_on_two_servers_is_two_instances(make_instance):
    make_instance(name="acme", whatsapp_instance="shop-1", evolution_url="http://evo-a.test")

    other = make_instance(
        name="globex", whatsapp_instance="shop-1", evolution_url="http://evo-b.test"
    )

    assert other.pk is not None


def test_a_tenant_saved_again_does_not_conflict_with_itself(make_instance):
    acme = make_instance(name="acme", whatsapp_instance="shop-1")

    acme.full_clean()


@pytest.mark.parametrize(
    "name",
    ["send-message-update", "status-instance", "creds-update", "messaging-history-set", "CALL"],
)
def test_every_evolution_event_name_is_refused_as_an_instance_name(make_instance, name):
    with pytest.raises(ValidationError) as info:
        make_instance(name=name)

    assert "Evolution event name" in " ".join(info.value.message_dict["name"])
