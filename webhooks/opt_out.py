"""Opt-out: a user who sends one of the instance's opt_out_keywords is recorded here
(by the worker, webhooks/processing.py), and API sends to the number are refused.

The outbox's send API calls `opted_out` before it queues a message, and refuses
with OPTED_OUT_ERROR. Replies to the user's own later messages are not affected.
"""

import re
from datetime import datetime

from webhooks.models import OptOut

# The error the send API answers (400, field "number") for an opted-out number.
OPTED_OUT_ERROR = (
    "This number opted out of messages from this instance (it sent an opt-out keyword): "
    "API sends to it are refused. It can still write to you, and its messages are answered."
)
_NOT_DIGIT = re.compile(r"\D")


def normalized_phone(phone: str) -> str:
    """The digits of a number as the hub stores them (5511987654321): a JID or a
    formatted number (+55 11 98765-4321) gives the same."""
    return _NOT_DIGIT.sub("", phone.split("@", 1)[0])


def record_opt_out(*, instance_id: int, phone: str, keyword: str, at: datetime) -> None:
    """Note the number as opted out (again: the time of the latest request)."""
    digits = normalized_phone(phone)
    if not digits:
        return
    OptOut.objects.update_or_create(
        instance_id=instance_id, phone=digits, defaults={"keyword": keyword[:64], "at": at}
    )


def opted_out(*, instance_id: int, phone: str) -> bool:
    """Whether API sends to this number must be refused."""
    digits = normalized_phone(phone)
    return bool(digits) and OptOut.objects.filter(instance_id=instance_id, phone=digits).exists()
