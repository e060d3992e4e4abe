"""A message's media in the console: the staff-only file view (from the delivery's
base64, else from a fake Evolution over HTTP), and what the message log and the
conversation page show of it."""

import base64
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from instances.models import InstanceConfig
from tests.e2e.harness import free_port
from tests.fakes import FakeEvolution
from tests.webhooks.conftest import message_body, queue_message
from webhooks.admin_media import safe_file_name, safe_mime_type
from webhooks.models import Conversation, InboundMessage

pytestmark = pytest.mark.django_db

LOG = "/admin/webhooks/inboundmessage/"
EVOLUTION_KEY = "acme-evolution-key-9f8e7d"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def media_url(message: InboundMessage) -> str:
    return f"{LOG}{message.pk}/media/"


@pytest.fixture
def evolution() -> Iterator[FakeEvolution]:
    fake = FakeEvolution(api_key=EVOLUTION_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def acme(make_instance, evolution) -> InstanceConfig:
    return make_instance(evolution_url=evolution.url, evolution_key=EVOLUTION_KEY)


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "pw"))
    return client


def queue(
    instance: InstanceConfig, fixture: str, *, message_id: str | None = None, **fields: Any
) -> InboundMessage:
    return queue_message(instance, message_body(fixture, message_id=message_id), **fields)


def with_media(message: InboundMessage, **media: Any) -> InboundMessage:
    """The row with content["media"] changed as the worker or a phone might write it."""
    message.content = {**message.content, "media": {**message.content["media"], **media}}
    message.save(update_fields=["content"])
    return message


def user_with(client: Client, *codenames: str, staff: bool = True) -> Client:
    user = User.objects.create_user("someone", password="pw", is_staff=staff)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    client.force_login(user)
    return client


# --- the file view -------------------------------------------------------------------
def test_staff_get_an_image_from_the_delivery_s_base64_shown_inline(staff, acme, evolution):
    message = queue(acme, "messages-upsert-image-base64.json")
    delivered = base64.b64decode(message.payload["data"]["message"]["base64"])

    response = staff.get(media_url(message))

    assert response.status_code == 200
    assert response.content == delivered
    assert response["Content-Type"] == "image/jpeg"
    assert response["Content-Disposition"].startswith('inline; filename="image-')
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Cache-Control"] == "private, max-age=300"
    assert evolution.received("/chat/getBase64FromMediaMessage/") == []


def test_without_base64_the_file_is_fetched_from_evolution_with_the_instance_s_key(
    staff, acme, evolution
):
    message = queue(acme, "messages-upsert-image-caption.json")
    evolution.media[message.message_id] = (PNG, "image/png", "defeito.png")
    with_media(message, mime_type="")

    response = staff.get(media_url(message))

    assert response.status_code == 200
    assert response.content == PNG
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == 'inline; filename="defeito.png"'
    (call,) = evolution.received("/chat/getBase64FromMediaMessage/")
    assert call.path == "/chat/getBase64FromMediaMessage/acme-wa"
    assert call.headers["apikey"] == EVOLUTION_KEY
    assert call.body["message"]["key"] == {
        "id": message.message_id,
        "remoteJid": message.chat_jid,
        "fromMe": False,
    }
    assert EVOLUTION_KEY not in response.content.decode("latin-1")


def test_a_voice_note_is_served_inline_with_its_codec(staff, acme, evolution):
    message = queue(acme, "messages-upsert-audio.json")
    evolution.media[message.message_id] = (b"OggS voice", "audio/ogg; codecs=opus", "")

    response = staff.get(media_url(message))

    assert response.status_code == 200
    assert response["Content-Type"] == "audio/ogg; codecs=opus"
    assert response["Content-Disposition"].startswith("inline; ")


def test_a_pdf_is_inline_and_another_document_is_an_attachment_with_a_safe_file_name(
    staff, acme, evolution
):
    pdf = queue(acme, "messages-upsert-document.json")
    evolution.media[pdf.message_id] = (b"%PDF-1.4", "application/pdf", "x.pdf")
    program = queue(acme, "messages-upsert-document.json", message_id="DOC2")
    with_media(program, mime_type="application/x-msdownload", file_name='..\\..\\"boleto"\r\n.exe')
    evolution.media["DOC2"] = (b"MZ", "application/x-msdownload", "")

    shown = staff.get(media_url(pdf))
    downloaded = staff.get(media_url(program))

    assert shown["Content-Disposition"] == 'inline; filename="Orcamento-2025.pdf"'
    assert downloaded["Content-Type"] == "application/x-msdownload"
    assert downloaded["Content-Disposition"] == 'attachment; filename="_boleto_.exe"'


def test_an_svg_image_is_never_shown_inline(staff, acme, evolution):
    message = with_media(
        queue(acme, "messages-upsert-image-caption.json"), mime_type="image/svg+xml"
    )
    evolution.media[message.message_id] = (b"<svg onload=alert(1)>", "image/svg+xml", "")

    response = staff.get(media_url(message))

    assert response["Content-Disposition"].startswith("attachment; ")
    assert 'class="media-thumbnail"' not in staff.get(f"{LOG}{message.pk}/change/").content.decode()


def test_anonymous_users_are_sent_to_the_login_page_without_bytes(client, acme):
    message = queue(acme, "messages-upsert-image-base64.json")

    response = client.get(media_url(message))

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=")
    assert "image" not in response.get("Content-Type", "")


def test_a_logged_in_user_who_is_not_staff_is_sent_to_the_login_page(client, acme):
    message = queue(acme, "messages-upsert-image-base64.json")
    user_with(client, "view_inboundmessage", staff=False)

    response = client.get(media_url(message))

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_a_staff_user_without_the_view_permission_on_messages_is_refused(client, acme):
    message = queue(acme, "messages-upsert-image-base64.json")
    user_with(client, "view_conversation")

    response = client.get(media_url(message))

    assert response.status_code == 403
    assert b"JFIF" not in response.content


def test_a_staff_user_with_the_view_permission_gets_the_file(client, acme):
    message = queue(acme, "messages-upsert-image-base64.json")
    user_with(client, "view_inboundmessage")

    assert client.get(media_url(message)).status_code == 200


def test_a_text_message_or_an_unknown_one_has_no_file(staff, acme):
    text = queue(acme, "messages-upsert-text.json")

    response = staff.get(media_url(text))

    assert response.status_code == 404
    assert "This message has no media." in response.content.decode()
    assert staff.get(f"{LOG}999999/media/").status_code == 404


def test_evolution_down_is_a_502_page_that_names_no_key(staff, make_instance, caplog):
    down = make_instance(
        name="down", evolution_url=f"http://127.0.0.1:{free_port()}", evolution_key=EVOLUTION_KEY
    )
    message = queue(down, "messages-upsert-image-caption.json")

    with caplog.at_level(logging.WARNING, logger="webhooks.admin_media"):
        response = staff.get(media_url(message))

    page = response.content.decode()
    assert response.status_code == 502
    assert "could not be fetched from Evolution" in page
    assert "Back to the message" in page
    assert EVOLUTION_KEY not in page
    assert caplog.records and EVOLUTION_KEY not in caplog.text


def test_a_message_evolution_no_longer_has_is_a_404_page(staff, acme, evolution):
    message = queue(acme, "messages-upsert-image-caption.json")

    response = staff.get(media_url(message))

    assert response.status_code == 404
    assert "Evolution no longer has this message&#x27;s file" in response.content.decode()


def test_a_file_over_media_max_bytes_is_not_fetched(staff, make_instance, evolution):
    small = make_instance(
        evolution_url=evolution.url, evolution_key=EVOLUTION_KEY, media_max_bytes=1000
    )
    declared = queue(small, "messages-upsert-image-caption.json")  # 184233 bytes declared
    undeclared = with_media(queue(small, "messages-upsert-audio.json"), size=None)
    evolution.media[undeclared.message_id] = (b"x" * 1001, "audio/ogg", "")

    refused = staff.get(media_url(declared))
    too_big = staff.get(media_url(undeclared))

    assert refused.status_code == 404
    assert "larger than this instance&#x27;s media_max_bytes (180 KB &gt; 1000 B)" in (
        refused.content.decode()
    )
    assert too_big.status_code == 404
    assert len(evolution.received("/chat/getBase64FromMediaMessage/")) == 1


@pytest.fixture
def legacy(make_instance) -> InstanceConfig:
    """The instance seeded from an old .env: replies go to the delivery's server."""
    return make_instance(
        name="default",
        is_default=True,
        legacy_mode=True,
        evolution_url="",
        evolution_key="",
        whatsapp_instance="",
        webhook_token="",
    )


def test_a_legacy_message_is_fetched_from_the_server_its_delivery_named(staff, legacy, evolution):
    message = queue(
        legacy,
        "messages-upsert-image-caption.json",
        reply_server_url=evolution.url,
        reply_api_key=EVOLUTION_KEY,
    )
    evolution.media[message.message_id] = (PNG, "image/png", "")

    response = staff.get(media_url(message))

    assert response.status_code == 200 and response.content == PNG
    (call,) = evolution.received("/chat/getBase64FromMediaMessage/")
    assert call.path == f"/chat/getBase64FromMediaMessage/{message.evolution_instance}"


def test_a_finished_legacy_message_has_no_server_left_to_fetch_from(staff, legacy, evolution):
    # A finished row keeps no reply server or key (webhooks/models.py).
    message = queue(
        legacy, "messages-upsert-image-caption.json", reply_server_url="", reply_api_key=""
    )

    response = staff.get(media_url(message))

    assert response.status_code == 404
    assert "no Evolution address to fetch it from" in response.content.decode()
    assert evolution.received() == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("image/JPEG", "image/jpeg"),
        ("audio/ogg; codecs=opus", "audio/ogg; codecs=opus"),
        ("text/html\r\nSet-Cookie: x=1", "application/octet-stream"),
        ("", "application/octet-stream"),
        ("image/png; x=<script>", "image/png"),
    ],
)
def test_a_mime_type_is_served_only_when_well_formed(value, expected):
    assert safe_mime_type(value) == expected


def test_a_file_name_keeps_no_path_quote_or_control_character():
    message = InboundMessage(pk=7, message_id="3EB0/../X", message_type="image")

    assert safe_file_name("../../etc/pass\x00wd", message=message, mime_type="") == "passwd"
    assert safe_file_name("relatório final.pdf", message=message, mime_type="") == (
        "relatório final.pdf"
    )
    assert safe_file_name(" .. ", message=message, mime_type="image/png") == "image-3EB0X.png"


# --- the message log -----------------------------------------------------------------
def test_the_message_page_shows_type_size_caption_note_transcript_and_a_thumbnail(staff, acme):
    message = with_media(
        queue(acme, "messages-upsert-image-caption.json"),
        note="larger than media_max_bytes (12.0 MB > 10.0 MB): not passed on",
    )

    page = staff.get(f"{LOG}{message.pk}/change/").content.decode()

    assert '<span class="media-type">image</span>' in page
    assert '<span class="media-mime">image/jpeg</span>' in page
    assert '<span class="media-size">180 KB</span>' in page
    assert "Esse é o defeito no produto" in page
    assert "larger than media_max_bytes (12.0 MB &gt; 10.0 MB): not passed on" in page
    assert f'<a class="media-open" href="{media_url(message)}"' in page
    assert f'<img class="media-thumbnail" src="{media_url(message)}"' in page
    assert 'loading="lazy"' in page and "max-width: 160px" in page


def test_a_voice_note_s_page_shows_its_transcript_and_a_player(staff, acme):
    message = queue(acme, "messages-upsert-audio.json", transcript="Quero uma pizza grande")

    page = staff.get(f"{LOG}{message.pk}/change/").content.decode()

    assert '<span class="media-type">audio</span>' in page
    assert '<span class="media-mime">audio/ogg; codecs=opus</span>' in page
    assert '<span class="media-size">14 KB</span>' in page
    assert '<blockquote class="media-transcript"' in page
    assert "Quero uma pizza grande" in page
    assert f'<audio class="media-player" controls preload="none" src="{media_url(message)}"' in page


def test_a_document_page_offers_its_file_by_name(staff, acme):
    message = queue(acme, "messages-upsert-document.json")

    page = staff.get(f"{LOG}{message.pk}/change/").content.decode()

    assert '<span class="media-file-name">Orcamento-2025.pdf</span>' in page
    assert "Open the file</a>" in page
    assert 'class="media-thumbnail"' not in page


def test_a_text_message_page_has_no_media_section(staff, acme):
    message = queue(acme, "messages-upsert-text.json")

    page = staff.get(f"{LOG}{message.pk}/change/").content.decode()

    assert "field-media_display" not in page


def test_the_list_marks_media_messages_with_a_flat_query_count(staff, acme):
    queue(acme, "messages-upsert-text.json")
    staff.get(LOG)  # session and permission caches
    with CaptureQueriesContext(connection) as text_only:
        staff.get(LOG)
    queue(acme, "messages-upsert-image-caption.json")
    queue(acme, "messages-upsert-audio.json", transcript="oi")
    queue(acme, "messages-upsert-document.json")

    with CaptureQueriesContext(connection) as with_media_rows:
        response = staff.get(LOG)

    page = response.content.decode()
    assert len(with_media_rows) == len(text_only)
    assert page.count('class="media-marker"') == 3
    assert '<span class="media-transcribed">transcribed</span>' in page
    rows = [q["sql"] for q in with_media_rows if '"webhooks_inboundmessage"."phone"' in q["sql"]]
    assert '"webhooks_inboundmessage"."content"' not in rows[0]


# --- the conversation page -----------------------------------------------------------
def conversation_page(client: Client, message: InboundMessage) -> str:
    chat = Conversation.objects.get(instance=message.instance, chat_jid=message.chat_jid)
    return client.get(f"/admin/webhooks/conversation/{chat.pk}/change/").content.decode()


def test_the_conversation_thread_shows_each_file_with_its_thumbnail_and_transcript(staff, acme):
    image = queue(acme, "messages-upsert-image-caption.json")
    voice = queue(acme, "messages-upsert-audio.json", transcript="Quero uma pizza grande")

    page = conversation_page(staff, image)

    assert page.count('<span class="media-type">image</span>') == 1
    assert "180 KB" in page and "14 KB" in page
    # The caption once, with the image (and as its alt text), not again as the text.
    assert page.count(">Esse é o defeito no produto<") == 1
    assert f'<img class="media-thumbnail" src="{media_url(image)}"' in page
    assert "Quero uma pizza grande" in page
    assert f'src="{media_url(voice)}"' in page


def test_a_conversation_viewer_who_may_not_open_messages_sees_no_link(client, acme):
    image = queue(acme, "messages-upsert-image-caption.json")
    user_with(client, "view_conversation")

    page = conversation_page(client, image)

    assert '<span class="media-type">image</span>' in page
    assert media_url(image) not in page
