"""An operator's day in the admin, in Chromium: add a tenant, provision it on Evolution,
link a phone by QR code, read the message log and retry a failed message.

The tests share one hub, one browser tab and the tenant made by the add form; each
works whether or not the others ran before it.
"""

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import (
    AGENT_PREFIX,
    PUBLIC_BASE_URL,
    QR_PICTURE,
    TIMEOUT_MS,
    Console,
    Fakes,
    qr_like_png,
)
from tests.conftest import load_fixture
from tests.e2e.harness import Hub, text_delivery, wait_until
from tests.fakes import PAIRING_CODE

NAME = "acme"
EVOLUTION_KEY = "evo-key-acme-0f3b9c"
AGENT_KEY = "agent-key-acme-7d21e4"
# Evolution puts its global key in every delivery; the hub must never show it.
DELIVERY_APIKEY = "evo-global-apikey-5a9e"
INSTANCES = "/admin/instances/instanceconfig/"
LOG = "/admin/webhooks/inboundmessage/"
# Bound on waiting for the worker: it answers within a second against the fakes.
STATUS_TIMEOUT = 20.0

expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Tenant:
    name: str
    change_path: str
    token: str


@pytest.fixture(scope="module")
def acme(console: Console, fakes: Fakes) -> Tenant:
    """The tenant, made through the admin's add form; its token is read off its change page."""
    console.secrets += [EVOLUTION_KEY, AGENT_KEY]
    page = console.page
    console.open(f"{INSTANCES}add/")
    page.fill("#id_name", NAME)
    page.fill("#id_evolution_url", fakes.evolution.url)
    page.fill("#id_evolution_key", EVOLUTION_KEY)
    page.fill("#id_agent_api_url", fakes.agent.url)
    page.fill("#id_agent_api_key", AGENT_KEY)
    page.fill("#id_default_agent", "support")
    console.shot("instance-add")
    page.click("input[name=_save]")
    page.wait_for_url(f"{console.url}{INSTANCES}")
    expect(page.locator(".messagelist .success")).to_contain_text(NAME)
    page.locator("#result_list").get_by_role("link", name=NAME, exact=True).click()
    expect(page).to_have_url(re.compile(rf"{INSTANCES}\d+/change/$"))
    token = console.webhook_token()
    console.secrets.append(token)
    return Tenant(name=NAME, change_path=urlsplit(page.url).path, token=token)


def post_text(
    hub: Hub, tenant: Tenant, *, text: str, phone: str, push_name: str, expect: str = "queued"
) -> str:
    """Deliver a text message as Evolution does; returns its message id."""
    message_id = f"3EB0{uuid.uuid4().hex[:16].upper()}"
    delivery = text_delivery(
        message_id=message_id,
        text=text,
        phone=phone,
        push_name=push_name,
        instance=tenant.name,
        apikey=DELIVERY_APIKEY,
    )
    response = hub.server.post_webhook(
        f"/webhook/evolution/{tenant.name}", delivery, token=tenant.token
    )
    assert response.json()["status"] == expect, response.text
    return message_id


def wait_for_status(console: Console, message_id: str, status: str) -> None:
    """Reload the log, searched by the message id, until the message shows `status`."""
    cell = console.page.locator("#result_list td.field-status_badge")
    deadline = time.monotonic() + STATUS_TIMEOUT
    while True:
        console.open(f"{LOG}?q={message_id}")
        shown = cell.all_inner_texts()
        if shown == [status]:
            return
        assert time.monotonic() < deadline, f"{message_id} shows {shown}, not {status}"
        time.sleep(0.3)


def open_message(console: Console, message_id: str) -> None:
    console.open(f"{LOG}?q={message_id}")
    console.page.locator("#result_list th.field-received a").click()
    expect(console.page).to_have_url(re.compile(rf"{LOG}\d+/change/"))


def sent_to(fakes: Fakes, phone: str) -> list[Any]:
    """What went to the number: replies name its digits, outbox sends its JID."""
    chat = (phone, f"{phone}@s.whatsapp.net")
    return [r.body for r in fakes.evolution.sent() if r.body.get("number") in chat]


def test_the_new_instance_is_listed_and_its_page_shows_the_webhook_url(
    console: Console, acme: Tenant
) -> None:
    page = console.page
    console.open(INSTANCES)
    row = page.locator("#result_list tbody tr", has_text=NAME)
    expect(row.locator("td.field-default_agent")).to_have_text("support")
    expect(row.locator("td.field-has_webhook_token")).to_have_text("yes")
    console.shot("instance-list")

    console.open(acme.change_path)
    expect(page.locator(".field-webhook_url_with_token_display .readonly")).to_have_text(
        f"{PUBLIC_BASE_URL}/webhook/evolution/{NAME}?token={acme.token}"
    )
    # Secrets are write-only: the form never sends them back to the browser.
    for field in ("evolution_key", "agent_api_key", "webhook_token"):
        expect(page.locator(f"#id_{field}")).to_have_value("")
    console.shot("instance-change", shown_secrets=(acme.token,))


def test_it_provisions_the_instance_and_links_a_phone_by_qr_code(
    console: Console, acme: Tenant, fakes: Fakes
) -> None:
    page = console.page
    console.open(acme.change_path)
    page.get_by_role("link", name="Provision on Evolution").click()
    expect(page.locator("#content-main ol li")).to_have_count(2)
    console.shot("provision-plan")

    page.get_by_role("button", name="Provision now").click()
    expect(page.locator(".messagelist li.success")).to_contain_text("Done:")
    steps = page.locator("#provisioning-steps tbody tr")
    expect(steps).to_have_count(2)
    assert [steps.nth(i).locator("td").nth(1).inner_text().strip() for i in range(2)] == [
        "Created",
        "Set",
    ]
    expect(steps.locator("img[alt=OK]")).to_have_count(2)
    webhook = fakes.evolution.instances[NAME]["webhook"]
    assert webhook["url"] == f"{PUBLIC_BASE_URL}/webhook/evolution/{NAME}"
    assert webhook["headers"] == {"X-Webhook-Token": acme.token}
    console.shot("provision-done")

    page.get_by_role("link", name=f"Back to {NAME}").click()
    page.get_by_role("link", name="Connect WhatsApp (QR code)").click()
    # Evolution has no QR code on the first call; the page's polling brings it.
    image = page.locator("#qr-image")
    expect(image).to_be_visible()
    assert image.get_attribute("src") == QR_PICTURE
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    expect(page.locator("#qr-pairing-code")).to_have_text(PAIRING_CODE)
    expect(page.locator("#qr-state")).to_have_text("connecting")
    console.shot("instance-qr", readme=True)

    fakes.evolution.open_session(NAME)
    expect(page.locator("#qr-message")).to_have_text("Connected")
    expect(page.locator("#qr-message")).to_have_class("success")
    expect(page.locator("#qr-state")).to_have_text("open")
    expect(image).to_be_hidden()
    expect(page.locator("#qr-pairing")).to_be_hidden()
    console.shot("instance-connected")


def test_a_delivered_message_shows_as_replied_in_the_message_log(
    console: Console, acme: Tenant, hub: Hub, fakes: Fakes
) -> None:
    console.secrets.append(DELIVERY_APIKEY)
    phone = "5511987654321"
    text = "Qual o horário de funcionamento?"
    message_id = post_text(hub, acme, text=text, phone=phone, push_name="Maria Souza")

    wait_for_status(console, message_id, "Replied")
    row = console.page.locator("#result_list tbody tr")
    expect(row.locator("td.field-instance")).to_have_text(NAME)
    expect(row.locator("td.field-chat")).to_have_text(phone)
    console.shot("message-log-replied")

    open_message(console, message_id)
    page = console.page
    expect(page.locator(".field-status_badge .readonly")).to_have_text("Replied")
    reply = f"{AGENT_PREFIX}: [Maria Souza]: {text}"
    expect(page.locator(".field-reply_text_display pre")).to_have_text(reply)
    expect(page.locator(".field-last_error_display .readonly")).to_have_text("-")
    console.shot("message-replied")
    assert sent_to(fakes, phone)[-1]["text"] == reply


def test_a_failed_send_shows_its_error_and_the_retry_action_replies_it(
    console: Console, acme: Tenant, hub: Hub, fakes: Fakes
) -> None:
    console.secrets.append(DELIVERY_APIKEY)
    phone = "5511912345678"
    fakes.evolution.failure = (
        400,
        load_fixture("api/error-400-not-on-whatsapp.json", fresh=False),
    )
    try:
        message_id = post_text(
            hub, acme, text="Vocês entregam no sábado?", phone=phone, push_name="João Lima"
        )
        wait_for_status(console, message_id, "Failed")
    finally:
        fakes.evolution.failure = None
    console.open(LOG)
    console.shot("message-log", readme=True)

    open_message(console, message_id)
    page = console.page
    expect(page.locator(".field-status_badge .readonly")).to_have_text("Failed")
    error = page.locator(".field-last_error_display pre")
    expect(error).to_contain_text("Evolution answered 400")
    expect(error).to_contain_text('"exists": false')
    console.shot("message-failed")
    agent_calls = len(fakes.agent.received())

    console.open(f"{LOG}?q={message_id}")
    page.locator("#result_list input[name=_selected_action]").check()
    page.select_option("select[name=action]", "retry_failed")
    page.locator("button[name=index]").click()
    expect(page.locator(".messagelist li.success")).to_have_text(
        "Requeued 1 of 1 selected messages."
    )
    console.shot("message-retry-requeued")

    wait_for_status(console, message_id, "Replied")
    console.open(LOG)
    console.shot("message-log-retried")
    # The agent had answered: only the send was done again.
    assert len(fakes.agent.received()) == agent_calls
    assert len(sent_to(fakes, phone)) == 1


CONVERSATIONS = "/admin/webhooks/conversation/"


def open_conversation(console: Console, phone: str) -> None:
    console.open(f"{CONVERSATIONS}?q={phone}")
    console.page.locator("#result_list th.field-chat a").click()
    expect(console.page).to_have_url(re.compile(rf"{CONVERSATIONS}\d+/change/"))


def press(console: Console, action: str) -> None:
    with console.page.expect_navigation():
        console.page.locator(f"button[data-action={action}]").click()
    expect(console.page.locator(".messagelist li.success")).to_be_visible()


def test_pausing_a_conversation_keeps_the_bot_quiet_there_until_it_is_resumed(
    console: Console, acme: Tenant, hub: Hub, fakes: Fakes
) -> None:
    console.secrets.append(DELIVERY_APIKEY)
    phone = "5511955554444"
    first = post_text(
        hub, acme, text="Oi, vocês têm bolo de cenoura?", phone=phone, push_name="Ana Costa"
    )
    wait_for_status(console, first, "Replied")

    open_conversation(console, phone)
    page = console.page
    expect(page.locator(".field-state_badge .readonly")).to_have_text("active")
    press(console, "pause")
    expect(page.locator(".field-state_badge .readonly")).to_contain_text("paused")

    quiet = post_text(hub, acme, text="Alô?", phone=phone, push_name="Ana Costa", expect="ignored")
    wait_for_status(console, quiet, "Ignored")
    open_conversation(console, phone)
    bubbles = page.locator(".field-chat_display .user-message")
    expect(bubbles.last).to_contain_text("Alô?")
    expect(bubbles.last).to_contain_text("ignored: paused")
    press(console, "resume")
    expect(page.locator(".field-state_badge .readonly")).to_have_text("active")

    answered = post_text(hub, acme, text="E de chocolate?", phone=phone, push_name="Ana Costa")
    wait_for_status(console, answered, "Replied")
    open_conversation(console, phone)
    replies = page.locator(".field-chat_display .bot-message")
    expect(replies).to_have_count(2)
    expect(replies.last).to_contain_text("E de chocolate?")
    console.shot("conversation", readme=True)
    texts = [body["text"] for body in sent_to(fakes, phone)]
    assert len(texts) == 2 and "Alô?" not in " ".join(texts)


def post_image(
    hub: Hub, tenant: Tenant, *, message_id: str, caption: str, phone: str, push_name: str
) -> None:
    """Deliver a photo as Evolution does without its webhook base64 option: the
    delivery describes the file, Evolution keeps it."""
    delivery = text_delivery(
        message_id=message_id,
        text="",
        phone=phone,
        push_name=push_name,
        instance=tenant.name,
        apikey=DELIVERY_APIKEY,
    )
    delivery["data"]["messageType"] = "imageMessage"
    delivery["data"]["message"] = {
        "imageMessage": {
            "url": "https://mmg.whatsapp.net/v/t62.7118-24/photo.enc",
            "mimetype": "image/png",
            "caption": caption,
            "fileLength": {"low": 4321, "high": 0, "unsigned": True},
        }
    }
    response = hub.server.post_webhook(
        f"/webhook/evolution/{tenant.name}", delivery, token=tenant.token
    )
    assert response.json()["status"] == "queued", response.text


def test_an_operator_sees_a_photo_s_thumbnail_in_the_conversation_and_opens_it(
    console: Console, acme: Tenant, hub: Hub, fakes: Fakes
) -> None:
    console.secrets.append(DELIVERY_APIKEY)
    phone = "5511933332222"
    caption = "A foto do defeito"
    photo = qr_like_png(modules=21, scale=6)
    message_id = f"3EB0{uuid.uuid4().hex[:16].upper()}"
    # The delivery carries no base64: the console asks Evolution for the file.
    fakes.evolution.media[message_id] = (photo, "image/png", "defeito.png")
    post_image(
        hub, acme, message_id=message_id, caption=caption, phone=phone, push_name="Paula Reis"
    )

    open_conversation(console, phone)
    page = console.page
    bubble = page.locator(".field-chat_display .user-message").last
    expect(bubble.locator(".media-type")).to_have_text("image")
    expect(bubble.locator(".media-mime")).to_have_text("image/png")
    expect(bubble.locator(".media-size")).to_have_text("4 KB")
    expect(bubble.locator(".media-caption")).to_have_text(caption)
    thumbnail = bubble.locator("img.media-thumbnail")
    thumbnail.scroll_into_view_if_needed()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle()
    )
    assert thumbnail.evaluate("img => img.getBoundingClientRect().width") <= 160
    console.shot("conversation-media")

    with page.context.expect_page() as opened:
        bubble.locator("a.media-open").click()
    tab = opened.value
    try:
        tab.wait_for_load_state("load")
        assert tab.url.endswith("/media/")
        width = tab.evaluate("document.images.length && document.images[0].naturalWidth")
        assert width == (21 + 2 * 4) * 6
    finally:
        tab.close()


def test_an_operator_answers_from_the_conversation_page_and_the_bot_stays_silent(
    console: Console, acme: Tenant, hub: Hub, fakes: Fakes
) -> None:
    console.secrets.append(DELIVERY_APIKEY)
    phone = "5511933334444"
    first = post_text(hub, acme, text="Posso falar com alguém?", phone=phone, push_name="Rui")
    wait_for_status(console, first, "Replied")
    open_conversation(console, phone)
    page = console.page

    page.fill("#id_reply_text", "Oi Rui, aqui é a Ana. Como posso ajudar?")
    with page.expect_navigation():
        page.click("#reply-send")

    expect(page.locator(".messagelist li.success")).to_contain_text("the bot is paused")
    expect(page.locator(".operator-message")).to_contain_text("aqui é a Ana")
    expect(page.locator(".field-state_badge")).to_contain_text("paused (Human)")
    # Through the outbox: paced after the bot's own reply (send_interval_ms).
    wait_until(
        lambda: sent_to(fakes, phone)[-1]["text"] == "Oi Rui, aqui é a Ana. Como posso ajudar?",
        timeout=15,
        what="the operator's text at the fake Evolution",
    )
    console.shot("conversation-operator-reply")

    agent_calls = len(fakes.agent.received())
    # Paused: the hub stores it as ignored at once (human takeover).
    later = post_text(
        hub, acme, text="Obrigado!", phone=phone, push_name="Rui", expect="ignored"
    )
    wait_for_status(console, later, "Ignored")
    assert len(fakes.agent.received()) == agent_calls
    assert len(sent_to(fakes, phone)) == 2
