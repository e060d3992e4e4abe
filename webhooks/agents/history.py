"""The memory the hub keeps for agents that have none (openai): the earlier
exchanges of the chat's current session, read from the stored messages.

No table of its own: every answered message row already holds what the user
wrote (`content`, a debounced burst's texts in `burst_texts`), what was sent
back (`reply_text`) and the session it was answered in (`session_name`, which
a reset or an idle expiry changes). A copy would have to be kept in step with
folds, retries and the pruning of old rows; this cannot disagree with the
conversation page. The read is one query on the index
webhooks_session_history (instance, chat_jid, session_name, id), walked
backwards from the newest row and stopped after `limit` rows: its cost is the
limit, not the chat's nor the inbox's size.
"""

from webhooks.agents.base import Exchange
from webhooks.models import InboundMessage


def session_history(
    *, instance_id: int, chat_jid: str, session: str, answering_pk: int, limit: int
) -> tuple[Exchange, ...]:
    """The session's last `limit` answered messages before `answering_pk`, oldest first."""
    if limit <= 0:
        return ()
    rows = (
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
    # Each row is one or two messages: `limit` rows hold at least `limit` messages.
    # The fallback text was not the agent's: the model must not think it said it.
    return tuple(
        Exchange(content=content, reply="" if fallback else reply)
        for content, reply, fallback in reversed(rows)
    )
