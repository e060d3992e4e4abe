"""A human answering from the console: the conversation page's reply box.

The text goes out through the outbox as kind `operator` (ahead of API sends,
paced like them: webhooks/outbox.py, webhooks/dispatcher.py), recorded with the
staff user, and pauses the bot in the chat as a human message from the phone
does (handoff_minutes).
"""

from django.db import transaction
from django.utils import timezone

from instances.models import InstanceConfig
from webhooks import outbox, transitions
from webhooks.chat_rules import OwnerAction
from webhooks.models import Conversation, OutboundKind

MAX_OPERATOR_TEXT = 4096


def queue_operator_message(*, instance_id: int, chat_jid: str, text: str, user_id: int) -> int:
    """Queue `text` to the chat as the operator `user_id`; returns the outbound row's id.

    The row's status then says how it went (queued, sent, or failed with its error),
    as for an API send.
    """
    instance = InstanceConfig.objects.get(pk=instance_id)
    now = timezone.now()
    with transaction.atomic():
        conversation, _ = Conversation.objects.get_or_create(
            instance_id=instance_id, chat_jid=chat_jid
        )
        # The human answered: the bot pauses there, as for a message from the phone.
        transitions.owner_wrote(
            conversation_id=conversation.pk, action=OwnerAction.HUMAN, instance=instance, now=now
        )
        queued = outbox.queue_send(
            instance=instance,
            chat_jid=chat_jid,
            text=text,
            kind=OutboundKind.OPERATOR,
            sent_by_id=user_id,
        )
    return queued.message.pk
