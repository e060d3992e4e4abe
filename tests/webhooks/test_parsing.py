"""webhooks.parsing against the Evolution API fixtures (1.8 to 2.4) and broken bodies."""

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import EVOLUTION_FIXTURES, load_fixture
from webhooks.parsing import (
    PEEK_BYTES,
    ParsedMessage,
    ParseError,
    event_name,
    ignore_reason,
    message_bodies,
    parse_connection_update,
    parse_message,
    peek_envelope,
    strip_secrets,
)

PN = "5511987654321@s.whatsapp.net"
LID = "123456789012345@lid"
FIXTURE_TIMESTAMP = 1765023983

UPSERT_FIXTURES = sorted(
    path.name
    for path in EVOLUTION_FIXTURES.glob("*.json")
    if event_name(json.loads(path.read_text())) == "messages.upsert"
)

# Per fixture: the normalized fields that matter, and the ignore reason when
# the message is fresh. Fields left out take the values of DEFAULTS.
DEFAULTS: dict[str, Any] = {
    "chat_jid": PN,
    "sender_jid": PN,
    "phone": "5511987654321",
    "reply_to": "5511987654321",
    "push_name": "Maria Souza",
    "from_me": False,
    "quoted": None,
    "mentions": (),
    "timestamp": FIXTURE_TIMESTAMP,
    "is_group": False,
    "is_broadcast": False,
    "evolution_instance": "tenant-acme-01",
    "mime_type": None,
    "size": None,
    "ignore": None,
}
EXPECTED: dict[str, dict[str, Any]] = {
    "messages-upsert-text.json": {
        "message_type": "text",
        "text": "Olá! Qual o horário de atendimento?",
    },
    "messages-upsert-extended-text-reply.json": {
        "message_type": "text",
        "text": "Pode ser às 15h?",
        "quoted": {
            "id": "3EB0DAA37D57825BEB8A75",
            "participant": "5511900000001@s.whatsapp.net",
            "text": "Temos horário às 14h ou 15h. Qual prefere?",
        },
    },
    "messages-upsert-extended-text-link.json": {
        "message_type": "text",
        "text": "Vi esse produto: https://loja.example.com/p/123",
    },
    "messages-upsert-image-caption.json": {
        "message_type": "image",
        "text": "Esse é o defeito no produto",
        "mime_type": "image/jpeg",
        "size": 184233,
    },
    "messages-upsert-image-base64.json": {
        "message_type": "image",
        "text": "Foto do comprovante",
        "mime_type": "image/jpeg",
        "size": 543,
    },
    "messages-upsert-audio.json": {
        "message_type": "audio",
        "text": "",
        "mime_type": "audio/ogg; codecs=opus",
        "size": 14782,
    },
    "messages-upsert-audio-speechtotext.json": {
        "message_type": "audio",
        "text": "[audio] Oi, queria saber se vocês entregam no sábado.",
        "mime_type": "audio/ogg; codecs=opus",
        "size": 14782,
    },
    "messages-upsert-video.json": {
        "message_type": "video",
        "text": "Olha como ficou",
        "mime_type": "video/mp4",
        "size": 2488321,
    },
    "messages-upsert-document.json": {
        "message_type": "document",
        "text": "Segue o orçamento assinado",
        "mime_type": "application/pdf",
        "size": 95811,
    },
    "messages-upsert-sticker.json": {
        "message_type": "sticker",
        "text": "",
        "mime_type": "image/webp",
        "size": 21318,
        "ignore": "sticker",
    },
    "messages-upsert-reaction.json": {
        "message_type": "reaction",
        "text": "👍",
        "ignore": "reaction",
    },
    "messages-upsert-location.json": {
        "message_type": "location",
        "text": "[location] -23.5613496, -46.6565712 "
        "(Av. Paulista, 1578, Bela Vista, São Paulo - SP)",
    },
    "messages-upsert-contact.json": {
        "message_type": "contact",
        "text": "[contact] João Pereira (+5511912345678)",
    },
    "messages-upsert-group.json": {
        "message_type": "text",
        "text": "@201987654321098 vocês abrem domingo?",
        "chat_jid": "120363025246125888@g.us",
        "sender_jid": "5511976543210@s.whatsapp.net",
        "phone": "5511976543210",
        "reply_to": "120363025246125888@g.us",
        "push_name": "Carlos Lima",
        "mentions": ("201987654321098@lid",),
        "is_group": True,
        # Groups and fromMe messages are the chat rules' to decide (test_chat_rules.py).
        "ignore": None,
    },
    "messages-upsert-fromme.json": {
        "message_type": "text",
        "text": "Oi Maria, aqui é o Pedro da loja, vou te atender.",
        "push_name": "Loja Acme",
        "from_me": True,
        "ignore": None,
    },
    "messages-upsert-status-broadcast.json": {
        "message_type": "image",
        "text": "Promoção de hoje!",
        "chat_jid": "status@broadcast",
        "reply_to": "status@broadcast",
        "is_broadcast": True,
        "mime_type": "image/jpeg",
        "size": 98133,
        "ignore": "broadcast",
    },
    "messages-upsert-lid-v2.3.6.json": {
        "message_type": "text",
        "text": "Bom dia, ainda tem disponível?",
    },
    "messages-upsert-lid-v2.3.7.json": {
        "message_type": "text",
        "text": "Bom dia, ainda tem disponível?",
    },
    "messages-upsert-lid-v2.4.0-rc2.json": {
        "message_type": "text",
        "text": "Bom dia, ainda tem disponível?",
    },
    "messages-upsert-lid-only.json": {
        "message_type": "text",
        "text": "Oi",
        "chat_jid": LID,
        "sender_jid": LID,
        "phone": "",
        "reply_to": LID,
    },
    "messages-upsert-text-legacy-v2.2.json": {"message_type": "text", "text": "Oi"},
    "messages-upsert-image-legacy-v2.2.json": {
        "message_type": "image",
        "text": "Esse é o defeito no produto",
        "mime_type": "image/jpeg",
        "size": 184233,
    },
    "messages-upsert-v1.8-extended-text.json": {"message_type": "text", "text": "Oi, tudo bem?"},
}


def upsert(message: dict[str, Any], **key: Any) -> dict[str, Any]:
    """A minimal 2.3.7 delivery around `message`; `key` overrides fields of data.key."""
    return {
        "event": "messages.upsert",
        "instance": "tenant-acme-01",
        "data": {
            "key": {"remoteJid": PN, "fromMe": False, "id": "ABC123", **key},
            "pushName": "Maria Souza",
            "message": message,
            "messageTimestamp": FIXTURE_TIMESTAMP,
        },
    }


def test_every_upsert_fixture_has_expectations() -> None:
    assert len(UPSERT_FIXTURES) >= 23
    assert set(UPSERT_FIXTURES) == set(EXPECTED)


@pytest.mark.parametrize("name", UPSERT_FIXTURES)
def test_it_normalizes_each_upsert_fixture(name: str) -> None:
    expected = {**DEFAULTS, **EXPECTED[name]}
    body = load_fixture(name, fresh=False)

    message = parse_message(body)

    assert message.message_id == body["data"]["key"]["id"]
    for field in (
        "message_type",
        "text",
        "chat_jid",
        "sender_jid",
        "phone",
        "reply_to",
        "push_name",
        "from_me",
        "quoted",
        "mentions",
        "timestamp",
        "is_group",
        "is_broadcast",
        "evolution_instance",
    ):
        assert getattr(message, field) == expected[field], field
    assert message.is_newsletter is False
    if expected["mime_type"] is None:
        assert message.media is None
    else:
        assert message.media is not None
        assert message.media.mime_type == expected["mime_type"]
        assert message.media.size == expected["size"]


@pytest.mark.parametrize("name", UPSERT_FIXTURES)
def test_it_gives_each_fresh_fixture_its_ignore_reason(name: str) -> None:
    message = parse_message(load_fixture(name, fresh=False))

    reason = ignore_reason(message, now=FIXTURE_TIMESTAMP, max_age_seconds=300)

    assert reason == {**DEFAULTS, **EXPECTED[name]}["ignore"]


def test_a_fixture_with_its_old_timestamp_is_stale_today() -> None:
    message = parse_message(load_fixture("messages-upsert-text.json", fresh=False))

    assert ignore_reason(message, now=time.time(), max_age_seconds=300) == "stale"
    assert ignore_reason(message, now=FIXTURE_TIMESTAMP + 300, max_age_seconds=300) is None
    assert ignore_reason(message, now=FIXTURE_TIMESTAMP + 301, max_age_seconds=300) == "stale"


def test_load_fixture_makes_a_message_fresh() -> None:
    message = parse_message(load_fixture("messages-upsert-text.json"))

    assert ignore_reason(message, now=time.time(), max_age_seconds=300) is None


def test_a_message_without_timestamp_is_never_stale() -> None:
    body = load_fixture("messages-upsert-text.json", fresh=False)
    del body["data"]["messageTimestamp"]
    message = parse_message(body)

    assert message.timestamp is None
    assert ignore_reason(message, now=time.time(), max_age_seconds=300) is None


def test_a_zero_max_age_turns_the_stale_check_off() -> None:
    message = parse_message(load_fixture("messages-upsert-text.json", fresh=False))

    assert ignore_reason(message, now=time.time(), max_age_seconds=0) is None


def test_the_timestamp_never_comes_from_date_time() -> None:
    body = load_fixture("messages-upsert-text.json", fresh=False)
    body["data"]["messageTimestamp"] = None

    assert parse_message(body).timestamp is None


@pytest.mark.parametrize(
    "name",
    [
        "messages-upsert-lid-v2.3.6.json",
        "messages-upsert-lid-v2.3.7.json",
        "messages-upsert-lid-v2.4.0-rc2.json",
    ],
)
def test_a_lid_chat_resolves_to_the_phone_whichever_field_holds_it(name: str) -> None:
    message = parse_message(load_fixture(name))

    assert message.chat_jid == PN
    assert message.sender_jid == PN
    assert message.phone == "5511987654321"
    assert message.reply_to == "5511987654321"


def test_a_lid_only_chat_is_answered_on_its_full_lid_jid() -> None:
    message = parse_message(load_fixture("messages-upsert-lid-only.json"))

    assert message.chat_jid == LID
    assert message.phone == ""
    assert message.reply_to == LID
    assert ignore_reason(message, now=time.time(), max_age_seconds=300) is None


def test_a_phone_with_a_device_suffix_is_normalized() -> None:
    message = parse_message(
        upsert({"conversation": "Oi"}, remoteJid="5511987654321:12@s.whatsapp.net")
    )

    assert message.chat_jid == PN
    assert message.reply_to == "5511987654321"


def test_a_group_sender_with_only_a_lid_has_no_phone() -> None:
    body = load_fixture("messages-upsert-group.json")
    del body["data"]["key"]["participantAlt"]

    message = parse_message(body)

    assert message.sender_jid == "98765432109876@lid"
    assert message.phone == ""
    assert message.reply_to == "120363025246125888@g.us"


def test_a_group_sender_is_found_by_suffix_in_either_participant_field() -> None:
    body = load_fixture("messages-upsert-group.json")
    key = body["data"]["key"]
    key["participant"], key["participantAlt"] = key["participantAlt"], key["participant"]

    assert parse_message(body).sender_jid == "5511976543210@s.whatsapp.net"


def test_the_v18_shape_takes_the_instance_from_owner() -> None:
    body = load_fixture("messages-upsert-v1.8-extended-text.json")
    del body["instance"]

    message = parse_message(body)

    assert message.evolution_instance == "tenant-acme-01"
    assert message.text == "Oi, tudo bem?"


def test_a_missing_instance_reads_as_empty() -> None:
    body = upsert({"conversation": "Oi"})
    del body["instance"]

    assert parse_message(body).evolution_instance == ""


def test_a_quote_and_mentions_inside_the_message_context_are_read() -> None:
    body = upsert(
        {
            "extendedTextMessage": {
                "text": "Sim, esse",
                "contextInfo": {
                    "stanzaId": "3EB0QUOTED",
                    "participant": LID,
                    "quotedMessage": {"imageMessage": {"caption": "Qual deles?"}},
                    "mentionedJid": ["5511900000001@s.whatsapp.net"],
                },
            }
        }
    )
    body["data"]["contextInfo"] = {"mentionedJid": [LID, "5511900000001@s.whatsapp.net"]}

    message = parse_message(body)

    assert message.quoted == {"id": "3EB0QUOTED", "participant": LID, "text": "Qual deles?"}
    assert message.mentions == (LID, "5511900000001@s.whatsapp.net")


@pytest.mark.parametrize(
    "container",
    ["ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2", "viewOnceMessageV2Extension"],
)
def test_content_is_read_through_nested_containers(container: str) -> None:
    inner = {"imageMessage": {"mimetype": "image/jpeg", "caption": "Veja"}}
    body = upsert({container: {"message": {"ephemeralMessage": {"message": inner}}}})

    message = parse_message(body)

    assert message.message_type == "image"
    assert message.text == "Veja"
    assert message.media is not None
    assert message.media.mime_type == "image/jpeg"


def test_a_document_with_caption_is_unwrapped() -> None:
    document = {"mimetype": "application/pdf", "fileName": "a.pdf", "caption": "Segue"}
    body = upsert({"documentWithCaptionMessage": {"message": {"documentMessage": document}}})

    message = parse_message(body)

    assert message.message_type == "document"
    assert message.text == "Segue"
    assert message.media is not None
    assert message.media.file_name == "a.pdf"


def test_an_edit_is_a_protocol_message_and_is_ignored() -> None:
    edit = {"protocolMessage": {"type": "MESSAGE_EDIT", "editedMessage": {"conversation": "x"}}}
    message = parse_message(upsert({"editedMessage": {"message": edit}}))

    assert message.message_type == "protocol"
    assert ignore_reason(message, now=FIXTURE_TIMESTAMP, max_age_seconds=300) == "protocol"


def test_a_protocol_message_alone_is_of_type_protocol() -> None:
    message = parse_message(
        upsert({"protocolMessage": {"type": "REVOKE"}, "messageContextInfo": {}})
    )

    assert message.message_type == "protocol"
    assert message.text == ""


def test_sender_key_distribution_and_context_info_alone_are_empty() -> None:
    body = upsert({"senderKeyDistributionMessage": {"groupId": "1@g.us"}, "messageContextInfo": {}})
    message = parse_message(body)

    assert message.message_type == "unknown"
    assert ignore_reason(message, now=FIXTURE_TIMESTAMP, max_age_seconds=300) == "empty"


def test_a_message_without_content_is_unknown_and_empty() -> None:
    body = upsert({})
    del body["data"]["message"]
    message = parse_message(body)

    assert message.message_type == "unknown"
    assert message.media is None
    assert ignore_reason(message, now=FIXTURE_TIMESTAMP, max_age_seconds=300) == "empty"


def test_a_newsletter_post_is_ignored() -> None:
    message = parse_message(
        upsert({"conversation": "News"}, remoteJid="120363000000000001@newsletter")
    )

    assert message.is_newsletter is True
    assert message.reply_to == "120363000000000001@newsletter"
    assert ignore_reason(message, now=FIXTURE_TIMESTAMP, max_age_seconds=300) == "newsletter"


def test_a_poll_lists_its_question_and_options() -> None:
    poll = {"name": "Melhor dia?", "options": [{"optionName": "Sábado"}, {"optionName": "Domingo"}]}

    message = parse_message(upsert({"pollCreationMessageV3": poll}))

    assert message.message_type == "poll"
    assert message.text == "[poll] Melhor dia? (Sábado / Domingo)"


def test_a_location_without_name_shows_only_coordinates() -> None:
    body = upsert({"locationMessage": {"degreesLatitude": -23.5, "degreesLongitude": -46.6}})

    assert parse_message(body).text == "[location] -23.5, -46.6"


def test_a_contact_without_vcard_shows_its_name() -> None:
    body = upsert({"contactMessage": {"displayName": "João"}})

    assert parse_message(body).text == "[contact] João"


def test_media_base64_and_the_s3_url_are_read_from_the_message() -> None:
    body = load_fixture("messages-upsert-image-base64.json")
    body["data"]["message"]["mediaUrl"] = "https://s3.example.com/acme/image.jpg"

    media = parse_message(body).media

    assert media is not None
    assert media.base64 == body["data"]["message"]["base64"]
    assert media.url == "https://s3.example.com/acme/image.jpg"
    assert media.caption == "Foto do comprovante"


@pytest.mark.parametrize(
    ("file_length", "size"),
    [
        (184233, 184233),
        ("184233", 184233),
        ({"low": 184233, "high": 0, "unsigned": True}, 184233),
        ({"low": -2, "high": 1, "unsigned": False}, (1 << 32) + 0xFFFFFFFE),
        ({"low": -1, "high": -1, "unsigned": True}, 2**64 - 1),
        ("12abc", None),
        ("9" * 5000, None),
        ({"low": "1", "high": 0}, None),
        ({"low": True, "high": 0}, None),
        (float("nan"), None),
        (-5, None),
    ],
)
def test_file_length_is_decoded_from_every_encoding(file_length: object, size: int | None) -> None:
    body = upsert({"imageMessage": {"mimetype": "image/jpeg", "fileLength": file_length}})

    media = parse_message(body).media

    assert media is not None
    assert media.size == size


@pytest.mark.parametrize(
    ("value", "timestamp"),
    [
        (1765023983, 1765023983),
        ("1765023983", 1765023983),
        ({"low": 1765023983, "high": 0, "unsigned": True}, 1765023983),
        ({"low": -1, "high": 0, "unsigned": False}, 4294967295),
        (1765023983123, 1765023983),
        (1765023983.9, 1765023983),
        (float("inf"), None),
        ({"low": 0, "high": 2**31 - 1}, None),
        (-1765023983, None),
        (0, None),
        ("2025-12-06T09:26:23.101Z", None),
    ],
)
def test_message_timestamp_is_decoded_from_every_encoding(
    value: object, timestamp: int | None
) -> None:
    body = upsert({"conversation": "Oi"})
    body["data"]["messageTimestamp"] = value

    assert parse_message(body).timestamp == timestamp


def test_a_list_shaped_data_is_one_body_per_message() -> None:
    body = load_fixture("messages-upsert-text.json")
    second = {**body["data"], "key": {**body["data"]["key"], "id": "SECOND"}}
    body["data"] = [body["data"], second, {"key": {}}]

    bodies = message_bodies(body)

    assert [part["data"] for part in bodies] == body["data"]
    assert all(part["instance"] == body["instance"] for part in bodies)
    assert [parse_message(part).message_id for part in bodies[:2]] == [
        body["data"][0]["key"]["id"],
        "SECOND",
    ]
    with pytest.raises(ParseError, match="id"):
        parse_message(bodies[2])


def test_an_object_shaped_data_is_one_body() -> None:
    body = load_fixture("messages-upsert-text.json")

    assert message_bodies(body) == [body]


def test_peek_envelope_finds_the_key_of_a_body_too_large_to_parse() -> None:
    body = load_fixture("messages-upsert-image-base64.json")
    raw = json.dumps(body).encode()

    stub = peek_envelope(raw[:PEEK_BYTES])

    assert stub is not None
    assert stub["event"] == "messages.upsert"
    assert stub["instance"] == body["instance"]
    message = parse_message(stub)
    full = parse_message(body)
    assert (message.message_id, message.chat_jid, message.from_me) == (
        full.message_id,
        full.chat_jid,
        full.from_me,
    )


@pytest.mark.parametrize(
    "raw",
    [b"", b"[1, 2]", b'{"data": {"key": {"id": "X"}}}', b"\xff" * 100, b'{"event": "a\\'],
)
def test_peek_envelope_of_a_body_without_an_event_is_none(raw: bytes) -> None:
    assert peek_envelope(raw) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda body: body.pop("data"), "data"),
        (lambda body: body.update(data=[]), "data"),
        (lambda body: body.update(data=["x"]), "data"),
        (lambda body: body["data"].pop("key"), "key"),
        (lambda body: body["data"].update(key=[]), "key"),
        (lambda body: body["data"]["key"].pop("id"), "id"),
        (lambda body: body["data"]["key"].update(id=7), "id"),
        (lambda body: body["data"]["key"].update(id="  "), "id"),
        (lambda body: body["data"]["key"].update(id="A" * 129), "id"),
        (lambda body: body["data"]["key"].pop("remoteJid"), "remoteJid"),
        (lambda body: body["data"]["key"].update(remoteJid=None), "remoteJid"),
        (lambda body: body["data"]["key"].update(remoteJid="1" * 120 + PN), "remoteJid"),
    ],
)
def test_it_raises_parse_error_naming_the_unusable_field(change: Any, reason: str) -> None:
    body = load_fixture("messages-upsert-text.json")
    change(body)

    with pytest.raises(ParseError, match=reason):
        parse_message(body)


@pytest.mark.parametrize("body", [None, 1, "x", [], [{}], {}, {"data": None}, {"data": [[]]}])
def test_a_body_that_is_not_a_delivery_raises_parse_error(body: Any) -> None:
    with pytest.raises(ParseError):
        parse_message(body)


def test_to_content_is_json_and_leaves_the_base64_out() -> None:
    message = parse_message(load_fixture("messages-upsert-image-base64.json"))

    content = json.loads(json.dumps(message.to_content(), allow_nan=False))

    assert content["media"]["has_base64"] is True
    assert "base64" not in content["media"]
    assert content["media"]["mime_type"] == "image/jpeg"
    assert content["message_id"] == message.message_id
    assert content["mentions"] == []
    assert set(content) == {field for field in ParsedMessage.__dataclass_fields__}


def test_to_content_marks_media_without_base64() -> None:
    content = parse_message(load_fixture("messages-upsert-image-caption.json")).to_content()

    assert content["media"]["has_base64"] is False
    assert content["media"]["size"] == 184233


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("messages.upsert", "messages.upsert"),
        ("MESSAGES_UPSERT", "messages.upsert"),
        ("messages-upsert", "messages.upsert"),
        (" Connection.Update ", "connection.update"),
        (None, ""),
        (12, ""),
        (["messages.upsert"], ""),
    ],
)
def test_event_name_normalizes_every_spelling(value: object, name: str) -> None:
    assert event_name({"event": value}) == name


def test_event_name_is_empty_when_missing() -> None:
    assert event_name({}) == ""


def test_strip_secrets_removes_only_the_top_level_apikey() -> None:
    body = load_fixture("messages-upsert-text.json")
    body["data"]["apikey"] = "nested-stays"
    original = copy.deepcopy(body)

    stripped = strip_secrets(body)

    assert "apikey" not in stripped
    assert stripped == {key: value for key, value in original.items() if key != "apikey"}
    assert stripped["data"]["apikey"] == "nested-stays"
    assert body == original


@pytest.mark.parametrize(
    ("name", "state", "reason"),
    [
        ("connection-update-open.json", "open", 200),
        ("connection-update-connecting.json", "connecting", 200),
        ("connection-update-close.json", "close", 401),
        ("connection-update-refused.json", "refused", 428),
    ],
)
def test_it_reads_state_and_reason_of_each_connection_update(
    name: str, state: str, reason: int
) -> None:
    body = load_fixture(name)

    assert event_name(body) == "connection.update"
    assert parse_connection_update(body) == (state, reason)


@pytest.mark.parametrize(
    "path", sorted((EVOLUTION_FIXTURES / "captured-2.3.7" / "deliveries").glob("*connection*"))
)
def test_it_reads_connection_updates_captured_from_a_real_server(path: Any) -> None:
    body = json.loads(path.read_text())["body_json"]

    assert parse_connection_update(body) == ("connecting", 200)


def test_a_connection_update_reason_may_be_a_string_or_missing() -> None:
    assert parse_connection_update({"data": {"state": "close", "statusReason": "401"}}) == (
        "close",
        401,
    )
    assert parse_connection_update({"data": {"state": "open"}}) == ("open", None)


@pytest.mark.parametrize(
    "body", [{}, {"data": None}, {"data": {}}, {"data": {"state": ""}}, {"data": {"state": 3}}]
)
def test_a_connection_update_without_state_raises_parse_error(body: dict[str, Any]) -> None:
    with pytest.raises(ParseError):
        parse_connection_update(body)


REPLACEMENTS: tuple[object, ...] = (None, 1, [], "x", {})


def key_paths(value: object, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in list(items):
        yield (*prefix, key)
        yield from key_paths(child, (*prefix, key))


def assert_parses_or_refuses(body: dict[str, Any]) -> None:
    try:
        message = parse_message(body)
    except ParseError:
        return
    assert isinstance(message, ParsedMessage)
    json.dumps(message.to_content(), allow_nan=False)
    ignore_reason(message, now=FIXTURE_TIMESTAMP, max_age_seconds=300)


@pytest.mark.parametrize("name", UPSERT_FIXTURES)
def test_a_mutated_fixture_parses_or_raises_parse_error(name: str) -> None:
    body = load_fixture(name, fresh=False)
    original = copy.deepcopy(body)
    checked = 0

    # Each path is changed in place and put back, so the (large) body is not
    # copied for every one of its thousands of mutations.
    for path in list(key_paths(body)):
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        old = parent[last]
        if isinstance(parent, dict):
            del parent[last]
            assert_parses_or_refuses(body)
            parent[last] = old
        else:
            parent.pop(last)
            assert_parses_or_refuses(body)
            parent.insert(last, old)
        for replacement in REPLACEMENTS:
            parent[last] = copy.deepcopy(replacement)
            assert_parses_or_refuses(body)
        parent[last] = old
        checked += 1

    assert checked > 20
    assert body == original


def test_parse_message_does_not_change_the_body() -> None:
    body = load_fixture("messages-upsert-group.json")
    original = copy.deepcopy(body)

    parse_message(body)

    assert body == original


def test_deeply_nested_containers_do_not_recurse_without_end() -> None:
    message: dict[str, Any] = {"conversation": "fundo"}
    for _ in range(5000):
        message = {"ephemeralMessage": {"message": message}}

    assert_parses_or_refuses(upsert(message))
    assert parse_message(upsert(message)).message_type == "unknown"
