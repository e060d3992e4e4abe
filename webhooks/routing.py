"""Which agent answers a message: the instance's routing rules, as pure functions.

The rules are tried in order; the first that matches a message answers it
and binds the chat to its agent. A message no rule matches goes to the agent
the chat is bound to, else to the instance's own (default) agent. A reset or
an idle expiry ends the binding (webhooks/transitions.py, webhooks/rows.py).
No database and no I/O: the worker calls these with what it has read.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from instances.models import Agent, RouteMatch
from webhooks.chat_rules import chat_matches, keyword_matches


@dataclass(frozen=True)
class Rule:
    """A routing rule as the worker holds it; agent_id None is the instance's own agent."""

    match: str
    value: str
    agent_id: int | None
    # Compiled once per batch, for regex rules (their value was checked when saved).
    pattern: re.Pattern[str] | None = None

    @classmethod
    def of(cls, *, match: str, value: str, agent_id: int | None) -> "Rule":
        pattern = re.compile(value) if match == RouteMatch.REGEX else None
        return cls(match=match, value=value, agent_id=agent_id, pattern=pattern)


@dataclass(frozen=True)
class Routing:
    """An instance's rules in order and its agents by id, read once per batch."""

    rules: tuple[Rule, ...]
    agents: dict[int, Agent]


@dataclass(frozen=True)
class Choice:
    """The agent for a message (None: the instance's own) and whether a rule chose it."""

    agent_id: int | None
    matched: bool


def rule_matches(*, rule: Rule, text: str, chat_jid: str, phone: str, is_group: bool) -> bool:
    if rule.match == RouteMatch.KEYWORD:
        return keyword_matches(rule.value, text)
    if rule.match == RouteMatch.PREFIX:
        return text.lstrip().casefold().startswith(rule.value.strip().casefold())
    if rule.match == RouteMatch.CONTAINS:
        return rule.value.strip().casefold() in text.casefold()
    if rule.match == RouteMatch.REGEX:
        return rule.pattern is not None and rule.pattern.search(text) is not None
    if rule.match == RouteMatch.CHAT:
        return chat_matches(pattern=rule.value, chat_jid=chat_jid, phone=phone, is_group=is_group)
    # A kind this worker does not know (a newer one): it never matches.
    return False


def choose_agent(
    *,
    rules: Sequence[Rule],
    bound: int | None,
    text: str,
    chat_jid: str,
    phone: str,
    is_group: bool,
) -> Choice:
    """The first matching rule's agent; else the bound agent (None: the default)."""
    for rule in rules:
        if rule_matches(rule=rule, text=text, chat_jid=chat_jid, phone=phone, is_group=is_group):
            return Choice(agent_id=rule.agent_id, matched=True)
    return Choice(agent_id=bound, matched=False)
