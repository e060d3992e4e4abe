"""How the bot behaves in a chat, as pure functions of an instance's settings.

Who may be answered (allow and block lists, groups and mentions), what a
message written from the business's own phone means (a keyword, or a human
taking over), and when a chat's open work is due (debounce). No database and
no I/O: ingest and the worker call these with what they have read.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from instances.models import GroupPolicy, InstanceConfig
from webhooks.parsing import ParsedMessage

# A chat that never stops typing is answered at the latest this many debounce
# windows after the first message of its burst.
DEBOUNCE_MAX_WINDOWS = 3


class OwnerAction(StrEnum):
    BOT_OFF = "bot off"
    BOT_ON = "bot on"
    HUMAN = "human takeover"


def keyword_matches(keyword: str, text: str) -> bool:
    """Trimmed and case-insensitive; a blank keyword never matches."""
    wanted = keyword.strip().casefold()
    return bool(wanted) and text.strip().casefold() == wanted


def owner_action(*, instance: InstanceConfig, text: str) -> OwnerAction:
    """What a fromMe message that the hub did not send means."""
    if keyword_matches(instance.bot_off_keyword, text):
        return OwnerAction.BOT_OFF
    if keyword_matches(instance.bot_on_keyword, text):
        return OwnerAction.BOT_ON
    return OwnerAction.HUMAN


def is_reset(*, instance: InstanceConfig, text: str) -> bool:
    return keyword_matches(instance.reset_keyword, text)


def is_opt_out(*, instance: InstanceConfig, text: str) -> bool:
    """A user's message asking for no more messages (opt_out_keywords)."""
    return any(keyword_matches(keyword, text) for keyword in instance.opt_out_keywords or ())


def _matches(pattern: str, value: str) -> bool:
    if not value:
        return False
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _any_match(patterns: Iterable[str], values: Sequence[str]) -> bool:
    return any(_matches(pattern, value) for pattern in patterns for value in values)


def chat_values(*, chat_jid: str, phone: str, is_group: bool) -> list[str]:
    """What a chat pattern is compared with: the phone number; in a group, the
    group's JID and the sender's number."""
    return [chat_jid, phone] if is_group else [phone]


def chat_matches(*, pattern: str, chat_jid: str, phone: str, is_group: bool) -> bool:
    """A `chat` routing rule, matched as the allow and block lists' entries are."""
    return _any_match([pattern], chat_values(chat_jid=chat_jid, phone=phone, is_group=is_group))


def access_reason(*, instance: InstanceConfig, message: ParsedMessage) -> str | None:
    """'blocked' or 'not allowed' when the lists keep this chat from the bot.

    In a 1:1 chat the chat's phone number is checked. In a group its JID and
    the sender's phone number are: either one on the block list blocks, either
    one on the allow list allows.
    """
    values = chat_values(chat_jid=message.chat_jid, phone=message.phone, is_group=message.is_group)
    if _any_match(instance.block_list, values):
        return "blocked"
    if instance.allow_list and not _any_match(instance.allow_list, values):
        return "not allowed"
    return None


def _user(jid: str) -> str:
    user = jid.partition("@")[0]
    return user.partition(":")[0]


def bot_jids(*, instance: InstanceConfig, wuid: str) -> set[str]:
    """The bot's own ids as they appear in mentionedJid (phone JIDs and LIDs)."""
    ids = set()
    for value in [*instance.bot_ids, wuid]:
        if not value:
            continue
        if "@" in value:
            user, _, server = value.partition("@")
            ids.add(f"{_user(user)}@{server}")
        else:
            ids.add(f"{value}@s.whatsapp.net")
    return ids


@dataclass(frozen=True)
class GroupContext:
    """What the group policy needs beyond the message: learned from the database."""

    bot_jids: set[str]
    quotes_the_hub: bool


def group_reason(
    *, instance: InstanceConfig, message: ParsedMessage, context: GroupContext | None
) -> str | None:
    """Why a group message is not answered ('group', 'no mention'); None to answer it."""
    if not message.is_group:
        return None
    policy = instance.group_policy
    if policy == GroupPolicy.ALL:
        return None
    if policy == GroupPolicy.MENTIONS and context is not None:
        if context.quotes_the_hub or any(jid in context.bot_jids for jid in message.mentions):
            return None
        return "no mention"
    return "group"


def needs_group_context(*, instance: InstanceConfig, message: ParsedMessage) -> bool:
    return message.is_group and instance.group_policy == GroupPolicy.MENTIONS


@dataclass(frozen=True)
class OpenMessage:
    """What the due time of a chat depends on, for each of its open messages."""

    next_attempt_at: datetime | None
    queued_at: datetime


def debounce_limit(*, first_queued_at: datetime, debounce_seconds: int) -> datetime:
    return first_queued_at + timedelta(seconds=debounce_seconds * DEBOUNCE_MAX_WINDOWS)


def due_time(
    *, open_messages: Sequence[OpenMessage], debounce_seconds: int, now: datetime
) -> datetime | None:
    """When a chat with these open messages (in handling order) must be looked at.

    The first one sets it (a retry's backoff holds back the rest of its chat);
    with debounce on, not before `debounce_seconds` after the newest one, and
    not after DEBOUNCE_MAX_WINDOWS windows from the first.
    """
    if not open_messages:
        return None
    first = open_messages[0]
    due = first.next_attempt_at or now
    if debounce_seconds > 0:
        newest = max(m.queued_at for m in open_messages)
        quiet = newest + timedelta(seconds=debounce_seconds)
        limit = debounce_limit(first_queued_at=first.queued_at, debounce_seconds=debounce_seconds)
        due = max(due, min(quiet, limit))
    return due
