"""Whether a reply's earlier attempt reached Evolution, asked before it is sent again.

An attempt "may have reached Evolution" when its outbound row was left
`sending` (the worker died during the send) or ended `unconfirmed` (a timeout,
or the connection dropped after the request was written). Only such a reply
costs a findMessages call; a reply never attempted is sent without one.

Evolution keeps the messages it sends (and receives) in its database unless
DATABASE_SAVE_DATA_NEW_MESSAGE is false; then findMessages answers an empty
page for everything. An empty answer alone cannot tell "not sent" from "not
kept", so when the chat shows no message of the hub's at all, the message being
answered (which Evolution received and would have kept) is looked up too: when
it is missing as well, Evolution keeps no messages and the reply is sent again,
at least once, as before this check existed.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from instances.clients.evolution import EvolutionClient, StoredMessage
from webhooks.rows import EarlierAttempt

# The hub's clock and Evolution's (which stamps messageTimestamp, in whole
# seconds) may differ a little: the search starts this much before the attempt.
CLOCK_SLACK = timedelta(seconds=60)
# Pages of the chat's own messages read at most (50 each): a chat where the
# hub or a human sent more than that since the attempt is not worth more calls.
MAX_PAGES = 4

NO_MESSAGES_KEPT = "Evolution keeps no messages: sent again, may be a duplicate"


class Verdict(Enum):
    SENT = "sent"
    NOT_SENT = "not_sent"
    # Sent again, at least once: Evolution keeps no messages, or could not
    # answer the question (a query it refuses, an answer the hub cannot read).
    NO_MESSAGES_KEPT = "no_messages_kept"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SendCheck:
    verdict: Verdict
    # The Evolution id of the message found (Verdict.SENT), else "".
    evolution_id: str = ""
    # Why the reply goes again although it may have gone out already.
    note: str = ""


# Which of these Evolution ids belong to other replies the hub recorded.
RecordedIds = Callable[[list[str]], Awaitable[set[str]]]


def _is_the_reply(stored: StoredMessage, *, chat_jid: str, text: str, since: datetime) -> bool:
    # Checked here too: a server that ignores one of the filters must not
    # make another chat's or an older message count.
    if not stored.from_me or stored.text.strip() != text.strip():
        return False
    if stored.remote_jid and stored.remote_jid != chat_jid:
        return False
    return stored.timestamp is None or stored.timestamp >= int((since - CLOCK_SLACK).timestamp())


async def check_earlier_send(
    evolution: EvolutionClient,
    *,
    attempt: EarlierAttempt,
    chat_jid: str,
    text: str,
    answered_id: str | None,
    now: datetime,
    recorded_ids: RecordedIds,
) -> SendCheck:
    """Ask Evolution whether `attempt` sent `text` to the chat; raises OutboundError.

    Matched on the id the hub recorded for the attempt when it has one, else on
    the chat's fromMe messages since the attempt began with the same text. A
    message already recorded as another of the hub's replies (an identical
    answer sent just before) is not this one.
    """
    if attempt.evolution_id:
        found = await evolution.find_messages(key_id=attempt.evolution_id)
        if any(stored.from_me for stored in found.records):
            return SendCheck(Verdict.SENT, attempt.evolution_id)
    window = (attempt.started_at - CLOCK_SLACK, now + CLOCK_SLACK)
    any_kept = False
    page, pages = 1, 1
    while page <= min(pages, MAX_PAGES):
        found = await evolution.find_messages(
            remote_jid=chat_jid, from_me=True, between=window, page=page
        )
        any_kept = any_kept or bool(found.records)
        matches = [
            stored.key_id
            for stored in found.records
            if _is_the_reply(stored, chat_jid=chat_jid, text=text, since=attempt.started_at)
        ]
        if matches:
            taken = await recorded_ids(matches)
            for key_id in matches:
                if key_id not in taken:
                    return SendCheck(Verdict.SENT, key_id)
        page, pages = page + 1, found.pages
    if any_kept:
        return SendCheck(Verdict.NOT_SENT)
    # Nothing of the hub's in the chat since the attempt: not sent, or not kept.
    # None: no message known to be in Evolution to ask about (an API send to a
    # number the instance never wrote to): treated as "keeps no messages".
    answered = await evolution.find_messages(key_id=answered_id) if answered_id else None
    if answered is not None and answered.records:
        return SendCheck(Verdict.NOT_SENT)
    return SendCheck(Verdict.NO_MESSAGES_KEPT, note=NO_MESSAGES_KEPT)
