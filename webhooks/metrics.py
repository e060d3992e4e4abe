"""Prometheus metrics: counters and histograms recorded by the pipeline, and
queue gauges read from the database at scrape time (so they are right
whichever process or machine does the work).

With several server processes set PROMETHEUS_MULTIPROC_DIR to one empty
directory for all of them (`make run` does), so /metrics adds them up.
"""

import hmac
import ipaddress
import os
from collections.abc import Iterator

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from instances.authentication import API_KEY_HEADER, api_key_matches
from webhooks.db import run_db
from webhooks.health import queue_stats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

deliveries = Counter(
    "omnihub_webhook_deliveries_total",
    "Webhook deliveries by instance and outcome.",
    ["instance", "outcome"],
)
messages_finished = Counter(
    "omnihub_messages_finished_total",
    "Messages that reached a final status, by instance and status.",
    ["instance", "status"],
)
processing_seconds = Histogram(
    "omnihub_message_processing_seconds",
    "From the delivery being stored to the message being finished.",
    ["instance"],
    buckets=LATENCY_BUCKETS,
)
agent_seconds = Histogram(
    "omnihub_agent_request_seconds",
    "Duration of agent calls, successful or not.",
    ["instance"],
    buckets=LATENCY_BUCKETS,
)
outbound_errors = Counter(
    "omnihub_outbound_errors_total",
    "Failed calls to agents and Evolution, by target and HTTP status ('none' when no answer).",
    ["instance", "target", "status"],
)
resend_checks = Counter(
    "omnihub_resend_checks_total",
    "Replies whose earlier attempt may have reached Evolution, by what findMessages said "
    "(sent, not_sent, no_messages_kept, unknown: the last two are sent again).",
    ["instance", "verdict"],
)
read_receipts_failed = Counter(
    "omnihub_read_receipts_failed_total",
    "markMessageAsRead calls (mark_read) that failed; they are not retried.",
    ["instance"],
)
voice_notes = Counter(
    "omnihub_voice_notes_total",
    "Voice notes handled, by how their text was had (speech_to_text: Evolution's; "
    "transcribed: the instance's STT; unreadable: stt_failure_message sent).",
    ["instance", "outcome"],
)
takeovers = Counter(
    "omnihub_takeovers_total",
    "Messages written from the business's phone that paused the bot in their chat.",
    ["instance"],
)
opt_outs = Counter(
    "omnihub_opt_outs_total",
    "User messages that were an opt-out keyword (the number was recorded as opted out).",
    ["instance"],
)
debounced_bursts = Counter(
    "omnihub_debounced_bursts_total",
    "Agent calls that answered two or more messages of a chat at once (debounce).",
    ["instance"],
)

outbox_sends = Counter(
    "omnihub_outbox_sends_total",
    "Outbox sends (API, operator) by instance, kind and outcome (sent, failed, retry, "
    "rate_limited, unconfirmed): the send rate is its rate().",
    ["instance", "kind", "outcome"],
)
outbox_paced_waits = Counter(
    "omnihub_outbox_paced_waits_total",
    "Times an outbox send waited for its pace, by reason (interval: send_interval_ms; "
    "daily_limit: the day's API sends are used up).",
    ["instance", "reason"],
)
outbox_pauses = Counter(
    "omnihub_outbox_rate_limit_pauses_total",
    "Outbox pauses after WhatsApp's rate limit (rate-overlimit, repeated 429/5xx).",
    ["instance"],
)


def paused_by_instance() -> dict[str, int]:
    from django.db.models import Count
    from django.utils import timezone

    from webhooks.models import Conversation
    from webhooks.selectors import paused_now_q

    paused = Conversation.objects.filter(paused_now_q(timezone.now()))
    return dict(paused.order_by().values_list("instance__name").annotate(count=Count("id")))


# The delivered and read ratios are of the messages sent in this last stretch.
RATIO_WINDOW = 3600


def outbox_by_instance() -> dict[str, dict[str, float]]:
    from datetime import timedelta

    from django.utils import timezone

    from webhooks.outbox import outbox_stats

    return outbox_stats(since=timezone.now() - timedelta(seconds=RATIO_WINDOW))


class QueueCollector(Collector):
    def __init__(
        self,
        depth: int,
        oldest: float,
        paused: dict[str, int] | None = None,
        outbox: dict[str, dict[str, float]] | None = None,
    ) -> None:
        self.depth = depth
        self.oldest = oldest
        self.paused = paused or {}
        self.outbox = outbox or {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "omnihub_queue_depth", "Messages queued and due now.", value=self.depth
        )
        yield GaugeMetricFamily(
            "omnihub_queue_oldest_age_seconds",
            "Age of the oldest message queued and due now.",
            value=self.oldest,
        )
        paused = GaugeMetricFamily(
            "omnihub_conversations_paused",
            "Conversations where the bot is paused now (takeover, bot off, operator).",
            labels=["instance"],
        )
        for name, count in sorted(self.paused.items()):
            paused.add_metric([name], count)
        yield paused
        gauges = {
            "depth": ("omnihub_outbox_depth", "Outbox sends queued (API, operator)."),
            "delivered_ratio": (
                "omnihub_outbound_delivered_ratio",
                "Of the messages sent in the last hour (replies too), the share delivered "
                "or read (Evolution's messages.update).",
            ),
            "read_ratio": (
                "omnihub_outbound_read_ratio",
                "Of the messages sent in the last hour (replies too), the share read.",
            ),
        }
        for key, (name, documentation) in gauges.items():
            family = GaugeMetricFamily(name, documentation, labels=["instance"])
            for instance, values in sorted(self.outbox.items()):
                if key in values:
                    family.add_metric([instance], values[key])
            yield family


def bearer_token_matches(request: HttpRequest, *, expected: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    return (
        scheme.lower() == "bearer"
        and bool(given)
        and hmac.compare_digest(given.encode(), expected.encode())
    )


def allowed(request: HttpRequest) -> bool:
    if settings.METRICS_TOKEN:
        # Then the token alone: behind a local proxy every client's address is
        # loopback, and a scraper should not hold the operator's full API key.
        return bearer_token_matches(request, expected=settings.METRICS_TOKEN)
    if api_key_matches(request.headers.get(API_KEY_HEADER)):
        return True
    try:
        client = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(client in ipaddress.ip_network(net) for net in settings.METRICS_ALLOW)


async def metrics_view(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        if settings.METRICS_TOKEN:
            return JsonResponse(
                {"detail": "Send header Authorization: Bearer <METRICS_TOKEN>."},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        return JsonResponse(
            {"detail": "Send header x-api-key, or scrape from an address in METRICS_ALLOW."},
            status=401,
        )
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    depth, oldest = await run_db(queue_stats)
    paused = await run_db(paused_by_instance)
    outbox = await run_db(outbox_by_instance)
    output = generate_latest(registry) + generate_latest(
        _one(QueueCollector(depth, oldest, paused, outbox))
    )
    return HttpResponse(output, content_type=CONTENT_TYPE_LATEST)


def _one(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
