from typing import Any

import pytest

from instances.models import AGENT_KEY_REQUIRED, InstanceConfig
from tests.conftest import CONVERSATION_FORM_DEFAULTS

CHANGELIST = "/admin/instances/instanceconfig/"
ADD = f"{CHANGELIST}add/"
SECRETS = {
    "evolution_key": "evo-secret-key-123",
    "agent_api_key": "agent-secret-key-456",
    "webhook_token": "webhook-secret-token-789",
}
NO_TOKEN_WARNING = "accepts unauthenticated deliveries"


def change_url(instance: InstanceConfig) -> str:
    return f"{CHANGELIST}{instance.pk}/change/"


def form_data(**overrides: Any) -> dict[str, Any]:
    """What the browser posts: unticked checkboxes are absent, secret inputs empty."""
    data: dict[str, Any] = {
        "name": "acme",
        "is_active": "on",
        "evolution_url": "http://evolution.acme.test",
        "evolution_key": "",
        "whatsapp_instance": "acme-wa",
        "agent_api_url": "http://agent.acme.test",
        "agent_api_key": "",
        "default_agent": "acme_agent",
        "agent_timeout": "60",
        "session_id_prefix": "",
        "fallback_message": "Try again later.",
        "webhook_token": "",
        **CONVERSATION_FORM_DEFAULTS,
        "_save": "Save",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance(**SECRETS)


def assert_no_secret_in(content: bytes, *, names: tuple[str, ...] = tuple(SECRETS)) -> None:
    for name in names:
        assert SECRETS[name].encode() not in content, name


def test_the_list_shows_the_columns_and_no_secret(admin_client, acme):
    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    for text in (b"acme", b"acme-wa", b"acme_agent", b">Token<", b"Updated at"):
        assert text in response.content
    assert_no_secret_in(response.content)


def test_the_list_searches_by_agent(admin_client, make_instance):
    make_instance(name="one", default_agent="sales_agent")
    make_instance(name="two", default_agent="support_agent")

    response = admin_client.get(CHANGELIST, {"q": "sales"})

    assert list(response.context["cl"].result_list) == [InstanceConfig.objects.get(name="one")]


def test_it_adds_an_instance_and_generates_a_token(admin_client):
    response = admin_client.post(
        ADD, form_data(evolution_key="new-evo-key", agent_api_key="new-agent-key")
    )

    assert response.status_code == 302
    instance = InstanceConfig.objects.get(name="acme")
    assert instance.evolution_key == "new-evo-key"
    assert instance.agent_api_key == "new-agent-key"
    assert len(instance.webhook_token) >= 32
    assert instance.default_agent == "acme_agent"


def test_it_adds_an_instance_with_the_token_typed_in(admin_client):
    admin_client.post(
        ADD, form_data(evolution_key="k", agent_api_key="k", webhook_token="my-own-token")
    )

    assert InstanceConfig.objects.get(name="acme").webhook_token == "my-own-token"


def test_the_no_token_checkbox_adds_an_instance_without_a_token(admin_client):
    response = admin_client.post(
        ADD, form_data(evolution_key="k", agent_api_key="k", no_webhook_token="on")
    )

    assert response.status_code == 302
    assert InstanceConfig.objects.get(name="acme").webhook_token == ""


def test_it_refuses_a_token_together_with_the_no_token_checkbox(admin_client):
    response = admin_client.post(
        ADD,
        form_data(evolution_key="k", agent_api_key="k", webhook_token="tok", no_webhook_token="on"),
    )

    assert response.status_code == 200
    assert b"Either set a token or accept deliveries without one" in response.content
    assert not InstanceConfig.objects.exists()


def test_it_requires_the_agent_key_on_create(admin_client):
    response = admin_client.post(ADD, form_data(evolution_key="k"))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["agent_api_key"] == [AGENT_KEY_REQUIRED]
    assert not InstanceConfig.objects.exists()


def test_it_requires_the_evolution_credentials_unless_legacy_mode(admin_client):
    response = admin_client.post(ADD, form_data(agent_api_key="k", is_default="on"))

    # Being the default is not enough: only an explicit legacy mode replies
    # without credentials of its own.
    assert response.context["adminform"].form.errors["evolution_key"] == [
        "Required unless legacy mode is on (replies through the server deliveries name)."
    ]


def test_it_shows_the_model_message_for_a_bad_url(admin_client, acme):
    response = admin_client.post(change_url(acme), form_data(evolution_url="ftp://evolution"))

    assert response.status_code == 200
    assert b"Enter an http:// or https:// URL with a host" in response.content
    acme.refresh_from_db()
    assert acme.evolution_url == "http://evolution.acme.test"


def test_editing_with_empty_secret_fields_keeps_them(admin_client, acme):
    response = admin_client.post(change_url(acme), form_data(default_agent="other_agent"))

    assert response.status_code == 302
    acme.refresh_from_db()
    assert acme.default_agent == "other_agent"
    for name, value in SECRETS.items():
        assert getattr(acme, name) == value


def test_the_edit_page_says_an_empty_secret_keeps_the_value(admin_client, acme):
    form = admin_client.get(change_url(acme)).context["adminform"].form

    for name in SECRETS:
        assert not form.fields[name].required
        assert "Leave empty to keep the current value" in form.fields[name].help_text


def test_a_typed_secret_replaces_the_stored_one(admin_client, acme):
    admin_client.post(change_url(acme), form_data(agent_api_key="rotated-agent-key"))

    acme.refresh_from_db()
    assert acme.agent_api_key == "rotated-agent-key"
    assert acme.evolution_key == SECRETS["evolution_key"]


def test_it_regenerates_the_token(admin_client, acme):
    admin_client.post(change_url(acme), form_data(regenerate_webhook_token="on"))

    acme.refresh_from_db()
    assert acme.webhook_token not in ("", SECRETS["webhook_token"])
    assert len(acme.webhook_token) >= 32


def test_the_no_token_checkbox_clears_the_token_on_edit(admin_client, acme):
    admin_client.post(change_url(acme), form_data(no_webhook_token="on"))

    acme.refresh_from_db()
    assert acme.webhook_token == ""


def test_unticking_no_token_on_a_token_less_instance_generates_one(admin_client, make_instance):
    instance = make_instance(webhook_token="")
    form = admin_client.get(change_url(instance)).context["adminform"].form
    assert form.fields["no_webhook_token"].initial is True

    admin_client.post(change_url(instance), form_data())

    instance.refresh_from_db()
    assert len(instance.webhook_token) >= 32


def test_an_instance_cannot_be_renamed(admin_client, acme):
    page = admin_client.get(change_url(acme))
    assert b'name="name"' not in page.content

    response = admin_client.post(change_url(acme), form_data(name="renamed"))

    assert response.status_code == 302
    assert list(InstanceConfig.objects.values_list("name", flat=True)) == ["acme"]


def test_the_change_page_never_shows_the_keys(admin_client, acme):
    response = admin_client.get(change_url(acme))

    assert response.status_code == 200
    assert_no_secret_in(response.content, names=("evolution_key", "agent_api_key"))
    # The token is shown once, inside the URL the operator pastes into Evolution.
    token = SECRETS["webhook_token"].encode()
    assert response.content.count(token) == 1
    assert b"/webhook/evolution/acme?token=" + token in response.content


def test_a_failed_submission_does_not_echo_the_typed_secrets(admin_client, acme):
    response = admin_client.post(
        change_url(acme),
        form_data(evolution_url="not a url", evolution_key="typed-evo-key-000"),
    )

    assert response.status_code == 200
    assert b"typed-evo-key-000" not in response.content
    assert_no_secret_in(response.content, names=("evolution_key", "agent_api_key"))


def test_the_add_page_shows_no_token(admin_client):
    response = admin_client.get(ADD)
    form = response.context["adminform"].form

    assert "regenerate_webhook_token" not in form.fields
    assert b"Webhook URL for Evolution" not in response.content
    assert form.instance.webhook_token.encode() not in response.content


def test_saving_an_instance_as_default_takes_the_flag_from_the_old_one(admin_client, make_instance):
    old = make_instance(name="old", is_default=True)
    new = make_instance(name="new")

    response = admin_client.post(change_url(new), form_data(name="new", is_default="on"))

    assert response.status_code == 302
    old.refresh_from_db()
    new.refresh_from_db()
    assert (old.is_default, new.is_default) == (False, True)


def test_the_make_default_action_moves_the_flag(admin_client, make_instance):
    old = make_instance(name="old", is_default=True)
    new = make_instance(name="new")

    response = admin_client.post(
        CHANGELIST,
        {"action": "make_default", "_selected_action": [new.pk], "index": "0"},
        follow=True,
    )

    assert b"The default instance is now new." in response.content
    old.refresh_from_db()
    new.refresh_from_db()
    assert (old.is_default, new.is_default) == (False, True)


def test_the_make_default_action_wants_exactly_one_instance(admin_client, make_instance):
    old = make_instance(name="old", is_default=True)
    one = make_instance(name="one")
    two = make_instance(name="two")

    response = admin_client.post(
        CHANGELIST,
        {"action": "make_default", "_selected_action": [one.pk, two.pk], "index": "0"},
        follow=True,
    )

    assert b"Select exactly one instance to make it the default." in response.content
    assert list(InstanceConfig.objects.filter(is_default=True)) == [old]


def test_a_token_less_instance_is_flagged_on_the_list_and_its_page(admin_client, make_instance):
    make_instance(name="guarded")
    open_door = make_instance(name="open-door", webhook_token="")

    listing = admin_client.get(CHANGELIST)
    page = admin_client.get(change_url(open_door))

    warnings = [str(m) for m in listing.context["messages"]]
    assert len(warnings) == 1
    assert "open-door" in warnings[0] and "guarded" not in warnings[0]
    assert listing.content.count(NO_TOKEN_WARNING.encode()) == 2  # message + column
    assert NO_TOKEN_WARNING.encode() in page.content


def test_an_instance_with_a_token_raises_no_warning(admin_client, acme):
    assert NO_TOKEN_WARNING.encode() not in admin_client.get(CHANGELIST).content
    assert NO_TOKEN_WARNING.encode() not in admin_client.get(change_url(acme)).content
