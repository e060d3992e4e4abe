"""Evolution API webhook endpoints. They store the delivery and answer; nothing else."""

import asyncio
import logging
from functools import partial

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from webhooks import metrics, wakeup, worker
from webhooks.db import run_db
from webhooks.ingest import (
    TOKEN_HEADER,
    Outcome,
    Result,
    accept_delivery,
    can_claim_on_insert,
    read_delivery,
)

logger = logging.getLogger(__name__)

LARGE_BODY = 256 * 1024

# Evolution drops a delivery for good on 400/401/403/404/422 and retries the rest.
STATUS_CODES = {
    Outcome.QUEUED: 200,
    Outcome.IGNORED: 200,
    Outcome.DUPLICATE: 200,
    Outcome.UNKNOWN_INSTANCE: 404,
    Outcome.BAD_TOKEN: 401,
    Outcome.BAD_BODY: 400,
}


def _hand_over(local: worker.Worker | None, stored: "asyncio.Future[Result]") -> None:
    """Give the worker the row claimed for its reserved slot, or the slot back.

    Also reads the outcome of a store whose request was cancelled, so that its
    error, if any, is not reported as never retrieved.
    """
    done = not stored.cancelled() and stored.exception() is None
    if local is not None:
        local.adopt(stored.result().claimed if done else None)


@csrf_exempt
async def evolution_webhook(
    request: HttpRequest, segment: str | None = None, event: str | None = None
) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"detail": "Use POST."}, status=405, headers={"Allow": "POST"})
    token = request.headers.get(TOKEN_HEADER) or request.GET.get("token")
    raw = request.body
    if len(raw) > LARGE_BODY:
        # Parsing megabytes of base64 would stall every other request on this loop.
        delivery = await asyncio.to_thread(read_delivery, raw)
    else:
        delivery = read_delivery(raw)
    # A slot of this process's worker, so that a new message can be claimed as
    # it is stored and started at once, without a claim query of its own.
    local = worker.local_worker() if can_claim_on_insert() else None
    stored = asyncio.ensure_future(
        run_db(
            accept_delivery,
            segment=segment,
            event=event,
            token=token,
            delivery=delivery,
            claim=local is not None,
        )
    )
    stored.add_done_callback(partial(_hand_over, local))
    try:
        # Shielded: should Evolution hang up meanwhile (Django then cancels the
        # view), the row is still stored, and a row claimed for the worker
        # still reaches it instead of waiting out its lease.
        result = await asyncio.shield(stored)
    except DatabaseError:
        # 503 makes Evolution deliver it again later; nothing was stored.
        logger.exception("webhook could not be stored segment=%s", segment)
        return JsonResponse({"detail": "The delivery could not be stored."}, status=503)
    if result.wake:
        wakeup.wake_up()
    metrics.deliveries.labels(result.instance_name or "(unknown)", result.outcome.value).inc()
    status = STATUS_CODES[result.outcome]
    if status != 200:
        return JsonResponse({"detail": result.detail}, status=status)
    body = {"status": result.outcome.value}
    if result.message_id:
        body["message_id"] = result.message_id
    if result.detail:
        body["detail"] = result.detail
    return JsonResponse(body)
