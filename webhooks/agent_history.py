"""The memory the hub keeps for agents that have none (openai): the earlier
exchanges of the chat's current session, read from the stored messages.

No table of its own: every answered message row already holds what the user
wrote (`content`, a debounced burst's texts in `burst_texts`), what was sent
back (`reply_text`) and the session it was answered in (`session_name`, which
a reset or an idle expiry changes). A copy would have to be kept in step with
folds, retries and the pruning of old rows; this cannot disagree with the
conversation page. The read is one query on the index
webhooks_session_history (instance, chat_jid, session_name, id; answered rows
only, so the webhook's INSERT of a new message never updates it), walked
backwards from the newest row and stopped after `limit` rows: its cost is the
limit, not the chat's nor the inbox's size.
"""

from typing import Any

from django.db.models import QuerySet

from instances.clients.agents.base import Exchange
from webhooks.models import InboundMessage


def history_rows(
    *, instance_id: int, chat_jid: str, session: str, answering_pk: int, limit: int
) -> "QuerySet[InboundMessage, tuple[dict[str, Any], str, bool]]":
    """The session's last `limit` answered rows before the one being answered, newest first."""
    return (
        InboundMessage.objects.filter(
            instance_id=instance_id,
            chat_jid=chat_jid,
            session_name=session,
            # Asked and answered (a reply, the fallback, or nothing to send);
            # a burst's folded messages are in their answering row's content.
            reply_text__isnull=False,
        )
        .exclude(pk=answering_pk)
        # The reset keyword's own row opens the session; it is no turn.
        .exclude(ignore_reason="reset")
        .order_by("-id")
        .values_list("content", "reply_text", "used_fallback")[:limit]
    )


def session_history(
    *, instance_id: int, chat_jid: str, session: str, answering_pk: int, limit: int
) -> tuple[Exchange, ...]:
    """The session's earlier exchanges, oldest first; each row is one or two
    messages, so `limit` rows hold at least the `limit` messages asked for."""
    if limit <= 0:
        return ()
    rows = history_rows(
        instance_id=instance_id,
        chat_jid=chat_jid,
        session=session,
        answering_pk=answering_pk,
        limit=limit,
    )
    # The fallback text was not the agent's: the model must not think it said it.
    return tuple(
        Exchange(content=content, reply="" if fallback else reply)
        for content, reply, fallback in reversed(rows)
    )
