"""Evolution API webhook endpoints. They store the delivery and answer; nothing else."""

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from instances.models import TOKEN_HEADER
from webhooks import metrics, parsing, wakeup, worker
from webhooks.db import run_db
from webhooks.ingest import (
    Outcome,
    Result,
    accept_delivery,
    can_claim_on_insert,
    read_delivery,
    store_delivery,
)

logger = logging.getLogger(__name__)

LARGE_BODY = 256 * 1024

# Evolution drops a delivery for good on 400/401/403/404/422 and retries the
# rest up to 10 times: only what is never worth delivering again gets a 4xx.
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


def read_body(request: HttpRequest) -> tuple[bytes, int | None]:
    """The body, or only its first bytes and its size when it is over the limit.

    Django's request.body would raise (a 400, which Evolution drops silently)
    for a body over DATA_UPLOAD_MAX_MEMORY_SIZE; such a body is answered
    from its beginning instead.
    """
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    declared = int(request.META.get("CONTENT_LENGTH") or 0)
    if declared > limit:
        return request.read(parsing.PEEK_BYTES), declared
    # Content-Length can be absent (chunked): read one byte past the limit to tell.
    raw = request.read(limit + 1)
    if len(raw) > limit:
        return raw[: parsing.PEEK_BYTES], len(raw) + len(request.read())
    return raw, None


async def _store(fn: Callable[..., Result], /, **kwargs: Any) -> Result:
    # A slot of this process's worker, so that a new message can be claimed as
    # it is stored and started at once, without a claim query of its own.
    local = worker.local_worker() if can_claim_on_insert() else None
    stored = asyncio.ensure_future(run_db(fn, claim=local is not None, **kwargs))
    stored.add_done_callback(partial(_hand_over, local))
    # Shielded: should Evolution hang up meanwhile (Django then cancels the
    # view), the row is still stored, and a row claimed for the worker still
    # reaches it instead of waiting out its lease.
    return await asyncio.shield(stored)


@csrf_exempt
async def evolution_webhook(
    request: HttpRequest, segment: str | None = None, event: str | None = None
) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"detail": "Use POST."}, status=405, headers={"Allow": "POST"})
    token = request.headers.get(TOKEN_HEADER) or request.GET.get("token")
    raw, size = read_body(request)
    try:
        # The path and token are checked first: the body is parsed only for an
        # authenticated delivery (small ones in the same database call).
        result = await _store(
            accept_delivery, segment=segment, event=event, token=token, raw=raw, size=size
        )
        if result.outcome is Outcome.AUTHENTICATED:
            assert result.instance is not None
            if len(raw) > LARGE_BODY:
                # Parsing megabytes of base64 would stall every other request on this loop.
                delivery = await asyncio.to_thread(read_delivery, raw)
            else:
                delivery = read_delivery(raw)
            result = await _store(
                store_delivery,
                instance=result.instance,
                legacy_route=result.legacy_route,
                delivery=delivery,
            )
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
    body: dict[str, Any] = {"status": result.outcome.value}
    if result.message_id:
        body["message_id"] = result.message_id
    if result.detail:
        body["detail"] = result.detail
    if len(result.messages) > 1:
        body["messages"] = [
            {"status": part.outcome.value, "message_id": part.message_id, "detail": part.detail}
            for part in result.messages
        ]
    return JsonResponse(body)
