"""Bad input at the webhook: generated JSON, mutated fixtures, odd bodies.

Whatever arrives, the endpoint answers without a 5xx (Evolution would deliver it
again, forever) and without logging a traceback, and it stores a row exactly
when it answers "queued", or "ignored" with a message id.
"""

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from django.db import transaction
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EVOLUTION_FIXTURES, load_fixture
from webhooks import parsing
from webhooks.ingest import Delivery, understand
from webhooks.models import InboundMessage

TOKEN = "fuzz-webhook-token"
URL = "/webhook/evolution/acme"
FIXTURES = sorted(path.name for path in EVOLUTION_FIXTURES.glob("*.json"))

pytestmark = pytest.mark.django_db


class Answer(NamedTuple):
    status: int
    body: dict[str, Any]
    rows: list[dict[str, Any]]


Deliver = Callable[..., Answer]


@pytest.fixture
def deliver(client: Client, make_instance, caplog: pytest.LogCaptureFixture) -> Deliver:
    make_instance(webhook_token=TOKEN)

    def deliver(raw: bytes, content_type: str = "application/json") -> Answer:
        # Each delivery starts from an empty message log, so a mutation is never
        # answered "duplicate" because of the one before.
        with transaction.atomic():
            caplog.clear()
            response = client.post(
                URL, data=raw, content_type=content_type, headers={"X-Webhook-Token": TOKEN}
            )
            assert response.status_code < 500, response.content[:500]
            rows = list(InboundMessage.objects.values("status", "message_type", "content"))
            transaction.set_rollback(True)
        tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
        assert not tracebacks, [r.getMessage() for r in tracebacks]
        assert response["Content-Type"] == "application/json"
        body = response.json()
        stored = response.status_code == 200 and body.get("status") in ("queued", "ignored")
        assert len(rows) == (1 if stored and "message_id" in body else 0), body
        return Answer(response.status_code, body, rows)

    return deliver


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


# --- (a) generated JSON -------------------------------------------------------------

# Every code point, lone surrogates included (json.dumps writes them as \ud800).
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**31, -(2**31) - 1, 2**63, 2**70, -(2**70)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    # `deliver` rolls back after each example, so sharing it is safe.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(body=JSON)
def test_any_json_gets_an_answer_that_is_not_a_server_error(deliver: Deliver, body: Any) -> None:
    answer = deliver(encode(body))

    if not isinstance(body, dict):
        assert answer.status == 400


# Evolution 2.3.7's messages.upsert envelope with every field the parser reads.
ENVELOPE: dict[str, Any] = {
    "event": "messages.upsert",
    "instance": "tenant-acme-01",
    "data": {
        "key": {
            "remoteJid": "5511987654321@s.whatsapp.net",
            "remoteJidAlt": "123456789012345@lid",
            "senderPn": "5511987654321@s.whatsapp.net",
            "participant": "98765432109876@lid",
            "participantAlt": "5511976543210@s.whatsapp.net",
            "fromMe": False,
            "id": "3AE65067D7A57FD1E064",
        },
        "pushName": "Maria Souza",
        "message": {},
        "contextInfo": {
            "stanzaId": "3EB0DAA37D57825BEB8A75",
            "participant": "5511900000001@s.whatsapp.net",
            "quotedMessage": {"conversation": "Temos horário às 14h ou 15h."},
            "mentionedJid": ["201987654321098@lid"],
        },
        "messageType": "conversation",
        "messageTimestamp": 1765023983,
        "owner": "tenant-acme-01",
        "source": "android",
    },
    "date_time": "2025-12-06T09:26:23.101Z",
    "sender": "5511900000001@s.whatsapp.net",
    "server_url": "https://evolution.example.com",
    "apikey": "B6D9E2A4-1F3C-4E8A-9C7B-2D5E8F0A1B3C",
}
# What data.message holds: one or two of these (the content types, a wrapper, media).
CONTENTS: dict[str, Any] = {
    "conversation": "Olá! Qual o horário de atendimento?",
    "extendedTextMessage": {"text": "veja https://example.com", "contextInfo": {"stanzaId": "X"}},
    "imageMessage": {
        "url": "https://mmg.whatsapp.net/o1/v/t62.7118-24/f1.enc",
        "mimetype": "image/jpeg",
        "caption": "segue a foto",
        "fileLength": {"low": 48213, "high": 0, "unsigned": True},
        "fileName": "foto.jpg",
    },
    "audioMessage": {"mimetype": "audio/ogg; codecs=opus", "fileLength": "9824"},
    "documentMessage": {"mimetype": "application/pdf", "fileName": "a.pdf", "caption": "pdf"},
    "locationMessage": {"degreesLatitude": -23.56, "degreesLongitude": -46.65, "name": "Av."},
    "contactMessage": {
        "displayName": "João Pereira",
        "vcard": "BEGIN:VCARD\nitem1.TEL;waid=5511912345678:+55 11 91234-5678\nEND:VCARD",
    },
    "contactsArrayMessage": {"contacts": [{"displayName": "Ana", "vcard": "TEL:+1 555"}]},
    "pollCreationMessage": {"name": "Horário?", "options": [{"optionName": "14h"}]},
    "listResponseMessage": {"title": "Opção 2"},
    "reactionMessage": {"text": "👍", "key": {"id": "X"}},
    "protocolMessage": {"type": 0},
    "ephemeralMessage": {"message": {"conversation": "some em 7 dias"}},
    "viewOnceMessageV2": {"message": {"imageMessage": {"mimetype": "image/jpeg"}}},
    "base64": "/9j/4AAQSkZJRgABAQAAAQABAAD/",
    "mediaUrl": "https://s3.example.com/evolution/foto.jpg",
    "speechToText": "bom dia",
}
DELETE = object()


def positions(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key and list index, depth first; of a Node Buffer ({"0": 12, "1": 200, ...})
    and of a list only the first two items, which the rest repeat."""
    if isinstance(node, dict):
        keys = list(node)
        if len(keys) > 2 and all(key.isdigit() for key in keys):
            keys = keys[:2]
        children = [(key, node[key]) for key in keys]
    elif isinstance(node, list):
        children = list(enumerate(node))[:2]
    else:
        return
    for key, child in children:
        yield (*path, key)
        yield from positions(child, (*path, key))


def replaced(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of node with the value at path replaced (or deleted); only the containers
    along the path are copied."""
    head, *rest = path
    copy: Any = list(node) if isinstance(node, list) else dict(node)
    if rest:
        copy[head] = replaced(node[head], tuple(rest), value)
    elif value is DELETE:
        del copy[head]
    else:
        copy[head] = value
    return copy


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible delivery, then up to five positions deleted or set to any JSON."""
    kinds = draw(st.lists(st.sampled_from(list(CONTENTS)), min_size=1, max_size=2, unique=True))
    body = replaced(ENVELOPE, ("data", "message"), {kind: CONTENTS[kind] for kind in kinds})
    body = replaced(body, ("data", "messageTimestamp"), int(time.time()))
    for _ in range(draw(st.integers(0, 5))):
        path = draw(st.sampled_from(list(positions(body))[::-1]))
        body = replaced(body, path, draw(st.just(DELETE) | JSON))
    return body


@FUZZ
@given(body=envelopes())
def test_an_envelope_with_anything_anywhere_gets_a_proper_answer(
    deliver: Deliver, body: Any
) -> None:
    answer = deliver(encode(body))

    if answer.body.get("status") == "queued":
        assert parsing.event_name(body) == "messages.upsert"


# --- (b) every fixture, mutated at every position -------------------------------------

ODD_VALUES = [DELETE, None, 1, -1, 2**70, "", [], {}, "x" * 100_000]


def shape(value: Any) -> Any:
    """What the database cares about in a parsed value: types, integer ranges, lengths."""
    if value is None or isinstance(value, bool | float):
        return type(value).__name__
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return "int32"
        return "int64" if -(2**63) <= value < 2**63 else "big"
    if isinstance(value, str):
        return min(len(value).bit_length(), 8)
    if isinstance(value, dict):
        return tuple((key, shape(item)) for key, item in value.items())
    return tuple(shape(item) for item in value)


def outcome(delivery: Delivery) -> Any:
    """Deliveries with the same outcome store the same kinds of values."""
    extracted: Any = None
    if delivery.message is not None:
        extracted = dataclasses.asdict(delivery.message)
    elif delivery.event == "connection.update" and delivery.body is not None:
        try:
            extracted = parsing.parse_connection_update(delivery.body)
        except parsing.ParseError as exc:
            extracted = str(exc)
    return (
        delivery.body is None,
        delivery.event,
        delivery.problem,
        delivery.ignore_reason,
        shape(extracted),
    )


def describe(path: tuple[Any, ...], value: Any) -> str:
    return f"{'.'.join(map(str, path))} = {'(deleted)' if value is DELETE else repr(value)[:20]}"


@pytest.mark.parametrize("name", FIXTURES)
def test_every_mutation_of_a_fixture_gets_a_proper_answer(deliver: Deliver, name: str) -> None:
    """Each mutation is parsed (pure and fast); one of each distinct outcome then goes
    through the endpoint and the database (a request costs hundreds of parses)."""
    original = load_fixture(name)
    representatives = {outcome(understand(original)): ("unchanged", original)}
    for path in positions(original):
        for value in ODD_VALUES:
            where = describe(path, value)
            body = replaced(original, path, value)
            try:
                result = outcome(understand(body))
            except Exception as exc:
                exc.add_note(f"{name}: {where}")
                raise
            representatives.setdefault(result, (where, body))

    for where, body in representatives.values():
        try:
            deliver(encode(body))
        except Exception as exc:
            exc.add_note(f"{name}: {where}")
            raise
    assert len(representatives) > 1


@pytest.mark.parametrize("depth", [900, 10_000])
def test_deep_nesting_is_never_a_crash(deliver: Deliver, depth: int) -> None:
    body = load_fixture("messages-upsert-text.json")
    inside = encode(body)[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"

    whole = deliver(b"[" * depth + b"]" * depth)
    nested = deliver(b'{"a": ' * depth + b"1" + b"}" * depth)
    in_a_message = deliver(inside)

    assert whole.status == 400
    assert nested.status in (200, 400)
    assert in_a_message.status in (200, 400)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\x00garbage",
        encode(load_fixture("messages-upsert-text.json")).replace(
            b"Maria Souza", b"Maria \xe9\xff"
        ),
        json.dumps(load_fixture("messages-upsert-text.json"), ensure_ascii=False).encode("latin-1"),
    ],
    ids=["binary", "invalid utf-8 in a name", "latin-1"],
)
def test_a_body_that_is_not_utf8_is_refused(deliver: Deliver, raw: bytes) -> None:
    assert deliver(raw).status == 400


LONE_SURROGATE = "\ud83d"  # half of an emoji, as a truncated WhatsApp name can end
TEXT_POSITIONS = [
    ("data", "pushName"),
    ("data", "message", "conversation"),
    ("data", "key", "id"),
    ("instance",),
]


@pytest.mark.parametrize("path", TEXT_POSITIONS, ids="/".join)
@pytest.mark.parametrize("odd", [f"Ana {LONE_SURROGATE}", "Ana\x00"], ids=["lone surrogate", "NUL"])
def test_characters_a_database_cannot_store_are_never_a_crash(
    deliver: Deliver, path: tuple[str, ...], odd: str
) -> None:
    body = replaced(load_fixture("messages-upsert-text.json"), path, odd)

    answer = deliver(encode(body))

    assert answer.status in (200, 400)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_body_with_nan_or_infinity_is_not_json(deliver: Deliver, constant: str) -> None:
    # Python's json reads them; RFC 8259 JSON (and PostgreSQL's jsonb) has no such numbers.
    raw = encode(load_fixture("messages-upsert-text.json"))[:-1] + f', "n": {constant}}}'.encode()

    assert deliver(raw).status == 400


def test_a_30_mb_image_is_queued(deliver: Deliver) -> None:
    body = load_fixture("messages-upsert-image-base64.json")
    body["data"]["message"]["base64"] = "A" * (30 * 1024 * 1024)

    answer = deliver(encode(body))

    assert (answer.status, answer.body["status"]) == (200, "queued")
    (row,) = answer.rows
    assert row["message_type"] == "image"
    assert row["content"]["media"]["has_base64"] is True


@pytest.mark.parametrize(
    ("content_type", "raw", "status"),
    [
        # Evolution always sends JSON: the body decides, whatever the header says.
        ("text/plain", encode(load_fixture("messages-upsert-text.json")), 200),
        (
            "application/x-www-form-urlencoded",
            encode(load_fixture("messages-upsert-text.json")),
            200,
        ),
        ("application/x-www-form-urlencoded", b"event=messages.upsert&data=x", 400),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--\r\n", 400),
        ("application/json", b"", 400),
        ("application/json", b"null", 400),
        ("application/json", b'"messages.upsert"', 400),
        ("application/json", b"{}", 200),
    ],
    ids=[
        "json as text/plain",
        "json as form",
        "form",
        "multipart",
        "empty",
        "null",
        "string",
        "{}",
    ],
)
def test_the_body_decides_not_the_content_type(
    deliver: Deliver, content_type: str, raw: bytes, status: int
) -> None:
    assert deliver(raw, content_type=content_type).status == status


def test_the_fixtures_are_all_here() -> None:
    assert len(FIXTURES) >= 30
    assert "messages-upsert-image-base64.json" in FIXTURES
