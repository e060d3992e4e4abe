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
