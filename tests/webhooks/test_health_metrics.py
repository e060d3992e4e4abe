import json
import logging
from datetime import timedelta

import pytest
from django.db import DatabaseError
from django.test import override_settings
from django.utils import timezone

from omnihub.logging import JsonFormatter
from tests.webhooks.conftest import message_body, queue_message
from webhooks import metrics
from webhooks.models import WorkerHeartbeat
from webhooks.worker import beat


def test_health_answers_without_the_database(client):
    # No django_db mark: any database access here would raise.
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_ready_is_503_when_no_worker_has_beaten(client):
    response = client.get("/health/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["workers_alive"] == 0
    assert "No worker heartbeat" in body["detail"]


@pytest.mark.django_db
def test_ready_reports_workers_and_the_backlog(client, make_instance):
    beat(worker_id="w1", started_at=timezone.now())
    acme = make_instance()
    queue_message(acme, received_at=timezone.now() - timedelta(seconds=90))

    response = client.get("/health/ready")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["workers_alive"] == 1
    assert body["backlog"] == 1
    assert body["oldest_queued_seconds"] >= 89


@pytest.mark.django_db
def test_ready_ignores_a_worker_silent_for_too_long(client):
    beat(worker_id="w1", started_at=timezone.now())
    WorkerHeartbeat.objects.update(last_seen_at=timezone.now() - timedelta(minutes=5))

    assert client.get("/health/ready").status_code == 503


@pytest.mark.django_db
def test_ready_is_503_when_the_database_fails(client, monkeypatch):
    def broken() -> None:
        raise DatabaseError("connection refused")

    monkeypatch.setattr("webhooks.health.readiness", broken)

    response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.json()["database"] == "error: DatabaseError"


@pytest.mark.django_db
def test_metrics_count_deliveries_and_show_the_queue(client, make_instance):
    acme = make_instance(webhook_token="")
    before = metrics.deliveries.labels("acme", "queued")._value.get()

    client.post("/webhook/evolution/acme", message_body(), content_type="application/json")
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert metrics.deliveries.labels("acme", "queued")._value.get() == before + 1
    assert 'omnihub_webhook_deliveries_total{instance="acme",outcome="queued"}' in text
    assert "omnihub_queue_depth 1.0" in text
    assert "omnihub_queue_oldest_age_seconds" in text
    assert acme.agent_api_key not in text


@pytest.mark.django_db
@override_settings(METRICS_ALLOW=[])
def test_metrics_refuse_an_address_outside_the_allow_list(client):
    response = client.get("/metrics")

    assert response.status_code == 401
    assert "x-api-key" in response.json()["detail"]


@pytest.mark.django_db
@override_settings(METRICS_ALLOW=[])
def test_metrics_accept_the_api_key_from_anywhere(client, api_key_headers):
    assert client.get("/metrics", **api_key_headers).status_code == 200


METRICS_TOKEN = "scrape-token-0123456789"


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=METRICS_TOKEN)
def test_metrics_accept_the_metrics_token_as_a_bearer_token(client):
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})

    assert response.status_code == 200
    assert "omnihub_queue_depth" in response.content.decode()


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=METRICS_TOKEN)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": "Bearer "},
        # The operator's full API key is not for scrapers once there is a token.
        {"x-api-key": "test-api-key"},
    ],
    ids=["nothing", "wrong token", "not bearer", "empty bearer", "api key"],
)
def test_with_a_metrics_token_a_loopback_client_needs_it_too(client, headers):
    # The test client's address, 127.0.0.1, is in the default METRICS_ALLOW:
    # behind a local proxy, every client would be.
    response = client.get("/metrics", headers=headers)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert "METRICS_TOKEN" in response.json()["detail"]


def test_json_logs_lift_the_message_fields():
    record = logging.LogRecord(
        "webhooks.processing",
        logging.INFO,
        __file__,
        1,
        "message instance=%s id=%s status=%s",
        ("acme", "ABC", "replied"),
        None,
    )

    line = json.loads(JsonFormatter().format(record))

    assert line["level"] == "INFO"
    assert line["message"] == "message instance=acme id=ABC status=replied"
    assert (line["instance"], line["id"], line["status"]) == ("acme", "ABC", "replied")
