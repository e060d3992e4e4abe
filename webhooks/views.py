"""Evolution API webhook endpoints. They store the delivery and answer; nothing else."""

import asyncio
import logging

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from webhooks import metrics, worker
from webhooks.db import run_db
from webhooks.ingest import TOKEN_HEADER, Outcome, accept_delivery, read_delivery

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
    # (Should this request be cancelled meanwhile, a row claimed for the slot
    # is taken again when its lease expires.)
    local = worker.local_worker()
    claimed = None
    try:
        result = await run_db(
            accept_delivery,
            segment=segment,
            event=event,
            token=token,
            delivery=delivery,
            claim=local is not None,
        )
        claimed = result.claimed
    except DatabaseError:
        # 503 makes Evolution deliver it again later; nothing was stored.
        logger.exception("webhook could not be stored segment=%s", segment)
        return JsonResponse({"detail": "The delivery could not be stored."}, status=503)
    finally:
        if local is not None:
            local.adopt(claimed)
    if result.outcome is Outcome.QUEUED and claimed is None:
        worker.wake_up()
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
