"""The claim's statements use indexes: their cost must not grow with the stored inbox."""

import json
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.webhooks.conftest import message_body, queue_message
from webhooks.health import queue_stats
from webhooks.ingest import record_message, understand
from webhooks.transitions import claim_conversations

pytestmark = pytest.mark.django_db


TABLES = ("webhooks_inboundmessage", "webhooks_conversation")


def _postgres_scans(node: dict[str, Any]) -> list[str]:
    """Nodes reading the table without an index condition: a Seq Scan, or an
    index walked from end to end (say, the primary key for ORDER BY id)."""
    found = []
    if (
        node.get("Relation Name") in TABLES
        and node["Node Type"] in SCAN_NODES
        and (node["Node Type"] == "Seq Scan" or "Index Cond" not in node)
    ):
        found.append(f"{node['Node Type']} {node.get('Index Name', '')}".strip())
    for child in node.get("Plans", []):
        found.extend(_postgres_scans(child))
    return found


SCAN_NODES = ("Seq Scan", "Index Scan", "Index Only Scan")


def table_scans(sql: str) -> list[str]:
    """The steps of `sql`'s plan that read a whole message or conversation table."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # A test table is tiny, where a scan is always cheapest: forbid it,
            # so that a statement no index can serve still shows a scan.
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}")
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            return _postgres_scans(plan[0]["Plan"])
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
        # "SCAN t" reads every row, "SCAN t USING INDEX i" every index entry.
        return [
            row[-1]
            for row in cursor.fetchall()
            if any(row[-1].startswith(f"SCAN {table}") for table in TABLES)
        ]


def test_no_statement_of_the_claim_scans_a_table(make_instance) -> None:
    instance = make_instance()
    queue_message(instance)

    with CaptureQueriesContext(connection) as captured:
        claimed = claim_conversations(limit=10)

    assert [len(batch.messages) for batch in claimed] == [1]
    selects = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT")]
    assert len(selects) >= 3, selects
    # The captured SQL has its values inlined: it is planned as it ran.
    for sql in selects:
        assert table_scans(sql) == [], sql


@pytest.mark.parametrize("queued_before", [False, True], ids=["new-chat", "open-chat"])
def test_no_statement_of_storing_a_message_scans_a_table(make_instance, queued_before) -> None:
    instance = make_instance()
    if queued_before:
        queue_message(instance, message_body(message_id="EARLIER"))
    delivery = understand(message_body(message_id="NOW"))

    with CaptureQueriesContext(connection) as captured:
        result = record_message(instance=instance, delivery=delivery, claim=True)

    assert result.outcome.value == "queued"
    # PostgreSQL also NOTIFYs the other processes' workers.
    statements = [q["sql"] for q in captured.captured_queries if not q["sql"].startswith("NOTIFY")]
    # The tenant lookup is the view's; here: the chat's row (with its due time or
    # its claim, one statement) and the message itself.
    assert len(statements) == 2, statements
    for sql in statements:
        if sql.startswith(("SELECT", "UPDATE", "INSERT", "WITH")):
            assert table_scans(sql) == [], sql


def test_the_backlog_figures_of_ready_and_metrics_read_only_the_due_index(make_instance) -> None:
    queue_message(make_instance())
    with CaptureQueriesContext(connection) as captured:
        assert queue_stats()[0] == 1

    [sql] = [q["sql"] for q in captured.captured_queries if "webhooks_inboundmessage" in q["sql"]]
    assert table_scans(sql) == [], sql
    if connection.vendor == "sqlite":
        # MIN(received_at) alone would be served from the received_at index,
        # walked until a queued row turns up: every row of a finished inbox.
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
            plan = [row[-1] for row in cursor.fetchall()]
        assert all("webhooks_due" in line for line in plan), plan
