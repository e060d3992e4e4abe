"""A human answering from the console: the conversation page's reply box.

`queue_operator_message` is the boundary the outbox provides (issue 12): the text
goes out as the operator's, recorded with the staff user, and pauses the bot in the
chat as a human message from the phone does (handoff_minutes).

OUTBOX TAKES OVER HERE: until the outbox is merged, this sends at once through
Evolution (sendText), recording the OutboundMessage row first so that its echo is
known as the hub's. The outbox replaces the send below with queueing the row as
kind "operator" for its paced dispatcher; the signature and the pause stay.
"""

from asgiref.sync import async_to_sync
from django.db import transaction
from django.utils import timezone

from instances.clients.evolution import EvolutionClient, EvolutionTarget
from instances.clients.http import OutboundError, new_http_client
from instances.models import InstanceConfig
from webhooks import rows, transitions
from webhooks.chat_rules import OwnerAction
from webhooks.models import Conversation, OutboundMessage, OutboundStatus

MAX_OPERATOR_TEXT = 4096


def operator_number(*, conversation: Conversation) -> str:
    """Where sendText goes, as the bot's replies: a one-to-one chat's number, else
    (a group, a chat known by its @lid only) its JID."""
    if conversation.is_group or not conversation.phone:
        return conversation.chat_jid
    return conversation.phone


def queue_operator_message(*, instance_id: int, chat_jid: str, text: str, user_id: int) -> int:
    """Send `text` to the chat as the operator `user_id`; returns the outbound row's id.

    The row's status says how it went (sent, or failed with its error); a failure
    raises nothing, as a queued message would not.
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
        outbound = OutboundMessage.objects.create(
            instance_id=instance_id,
            chat_jid=chat_jid,
            text=text,
            sent_by_id=user_id,
            status=OutboundStatus.SENDING,
        )
    # --- OUTBOX TAKES OVER HERE: from this line on, the outbox's dispatcher sends. ---
    _send_now(
        instance=instance, outbound=outbound, number=operator_number(conversation=conversation)
    )
    return outbound.pk


def _send_now(*, instance: InstanceConfig, outbound: OutboundMessage, number: str) -> None:
    target = EvolutionTarget(
        base_url=instance.evolution_url,
        api_key=instance.evolution_key,
        instance_name=instance.evolution_instance_name,
    )

    async def send() -> str:
        async with new_http_client(max_connections=2) as http:
            answer = await EvolutionClient(target=target, http=http).send_text(
                number=number, text=outbound.text
            )
        key = answer.get("key") if isinstance(answer, dict) else None
        return str(key.get("id", "")) if isinstance(key, dict) else ""

    if not (target.base_url and target.api_key):
        rows.finish_outbound(
            outbound_id=outbound.pk,
            status=OutboundStatus.FAILED,
            evolution_id="",
            error="No Evolution URL/key to send with.",
        )
        return
    try:
        evolution_id = async_to_sync(send)()
    except OutboundError as exc:
        status = OutboundStatus.UNCONFIRMED if exc.maybe_sent else OutboundStatus.FAILED
        rows.finish_outbound(
            outbound_id=outbound.pk, status=status, evolution_id="", error=str(exc)
        )
        return
    rows.finish_outbound(
        outbound_id=outbound.pk, status=OutboundStatus.SENT, evolution_id=evolution_id, error=""
    )
