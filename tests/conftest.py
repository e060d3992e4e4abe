"""Fixtures shared by every test package."""

import json
import time
from pathlib import Path
from typing import Any

import pytest

from instances.models import InstanceConfig

FIXTURES = Path(__file__).parent / "fixtures"
EVOLUTION_FIXTURES = FIXTURES / "evolution"


def load_fixture(name: str, *, fresh: bool = True) -> dict[str, Any]:
    """A webhook body from tests/fixtures/evolution; `fresh` sets its timestamp to now."""
    body = json.loads((EVOLUTION_FIXTURES / name).read_text())
    if fresh and isinstance(body.get("data"), dict) and "messageTimestamp" in body["data"]:
        body["data"]["messageTimestamp"] = int(time.time())
    return body


def instance_fields(**overrides: Any) -> dict[str, Any]:
    """The fields of a valid non-default tenant, with overrides."""
    fields: dict[str, Any] = {
        "name": "acme",
        "evolution_url": "http://evolution.acme.test",
        "evolution_key": "acme-evolution-key",
        "agent_api_url": "http://agent.acme.test",
        "agent_api_key": "acme-agent-key",
        "default_agent": "acme_agent",
    }
    fields.update(overrides)
    # One Evolution instance per tenant (two on one URL are refused): acme-wa, ...
    fields.setdefault("whatsapp_instance", f"{fields['name']}-wa")
    return fields


FORMSET_COUNTS = ("TOTAL_FORMS", "INITIAL_FORMS")
# What the admin's instance form posts for the conversation settings it shows
# with their defaults (the JSON lists are text areas).
CONVERSATION_FORM_DEFAULTS = {
    "handoff_minutes": "30",
    "bot_off_keyword": "/bot off",
    "bot_on_keyword": "/bot on",
    "debounce_seconds": "0",
    "group_policy": "ignore",
    "bot_ids": "[]",
    "allow_list": "[]",
    "opt_out_keywords": '["STOP", "SAIR", "PARAR", "CANCELAR"]',
    "opt_out_reply": (
        "Done: you will get no more messages from us. Write to us any time if you need help."
    ),
    "block_list": "[]",
    "reset_keyword": "/reset",
    "reset_reply": "Conversation restarted.",
    "session_idle_minutes": "0",
    "max_concurrent": "16",
    # The agent kind's fields (the Agent group), at their defaults.
    "agent_kind": "automagik",
    "system_prompt": "",
    "history_limit": "20",
    # The Replies group at its defaults (split_replies and quote_replies unticked).
    "typing_ms_per_char": "0",
    "send_media_links": "on",
    # The Media and voice notes group at its defaults (mark_read unticked).
    "media_max_bytes": str(10 * 1024 * 1024),
    "stt_url": "",
    "stt_key": "",
    "stt_model": "whisper-1",
    "stt_failure_message": "Sorry, I could not understand this voice note. Could you write it?",
    # The Status callbacks group, empty.
    "callback_url": "",
    "callback_secret": "",
    # The Outbound group at its defaults.
    "send_interval_ms": "1000",
    "daily_send_limit": "0",
    "warmup_days": "0",
    "send_backoff_minutes": "5",
    # The inlines of other agents and routing rules: none, nothing changed.
    **{f"{prefix}-{name}": "0" for prefix in ("agents", "routes") for name in FORMSET_COUNTS},
}


@pytest.fixture
def make_instance(db):
    """Create a valid non-default instance; keyword arguments override fields."""

    def make(**overrides: Any) -> InstanceConfig:
        instance = InstanceConfig(**instance_fields(**overrides))
        instance.full_clean()
        instance.save()
        return instance

    return make


@pytest.fixture
def api_key_headers() -> dict[str, str]:
    from django.conf import settings

    return {"HTTP_X_API_KEY": settings.OMNIHUB_API_KEY}


@pytest.fixture(autouse=True)
def _close_database_threads():
    """A test that ran the group committer leaves no connection open behind it
    (PostgreSQL would refuse to drop the test database)."""
    yield
    from webhooks.db import close_database_threads

    close_database_threads()


@pytest.fixture(scope="session", autouse=True)
def _close_the_connection_pool(django_db_setup, django_db_blocker):
    """Return psycopg's pooled connections before the test database is dropped."""
    yield
    from django.db import connections

    with django_db_blocker.unblock():
        for connection in connections.all():
            if hasattr(connection, "close_pool"):
                connection.close_pool()
