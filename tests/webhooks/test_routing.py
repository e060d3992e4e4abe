"""Choosing the agent of a message from the instance's rules: pure functions."""

import pytest

from webhooks.routing import Choice, Rule, choose_agent, rule_matches

PHONE = "5511987654321"
GROUP = "120363041234567890@g.us"


def matches(match: str, value: str, text: str = "", **chat: object) -> bool:
    where = {"chat_jid": f"{PHONE}@s.whatsapp.net", "phone": PHONE, "is_group": False, **chat}
    return rule_matches(rule=Rule.of(match=match, value=value, agent_id=1), text=text, **where)


@pytest.mark.parametrize(
    ("match", "value", "text", "expected"),
    [
        ("keyword", "Vendas", "  vendas ", True),
        ("keyword", "vendas", "quero vendas", False),
        ("prefix", "/sales", "/SALES please", True),
        ("prefix", "/sales", "hi /sales", False),
        ("contains", "boleto", "Meu BOLETO venceu", True),
        ("contains", "boleto", "pix", False),
        ("regex", r"pedido\s+#?\d+", "sobre o pedido #123", True),
        ("regex", r"^\d+$", "abc", False),
        # A regex is as written: (?i) makes it case-insensitive.
        ("regex", "(?i)^oi", "OI", True),
        ("regex", "^oi", "OI", False),
    ],
)
def test_each_text_match_reads_the_message_as_documented(match, value, text, expected) -> None:
    assert matches(match, value, text) is expected


def test_a_chat_rule_matches_the_number_with_a_trailing_wildcard() -> None:
    assert matches("chat", "5511*")
    assert matches("chat", PHONE)
    assert not matches("chat", "5521*")


def test_a_chat_rule_matches_a_group_by_its_jid_or_its_sender() -> None:
    in_group = {"chat_jid": GROUP, "phone": "5521900000000", "is_group": True}
    assert matches("chat", GROUP, **in_group)
    assert matches("chat", "5521*", **in_group)
    assert not matches("chat", "5511*", **in_group)


def test_a_kind_the_worker_does_not_know_never_matches() -> None:
    assert not matches("sentiment", "angry", "angry")


def choose(rules: list[Rule], *, bound: int | None = None, text: str = "oi") -> Choice:
    return choose_agent(
        rules=rules,
        bound=bound,
        text=text,
        chat_jid=f"{PHONE}@s.whatsapp.net",
        phone=PHONE,
        is_group=False,
    )


def test_the_first_matching_rule_wins() -> None:
    rules = [
        Rule.of(match="keyword", value="vendas", agent_id=1),
        Rule.of(match="contains", value="vendas", agent_id=2),
    ]

    assert choose(rules, text="vendas") == Choice(agent_id=1, matched=True)
    assert choose(rules, text="falar com vendas") == Choice(agent_id=2, matched=True)


def test_an_unmatched_message_goes_to_the_bound_agent_else_the_default() -> None:
    rules = [Rule.of(match="keyword", value="vendas", agent_id=1)]

    assert choose(rules, bound=7, text="oi") == Choice(agent_id=7, matched=False)
    assert choose(rules, bound=None, text="oi") == Choice(agent_id=None, matched=False)
    assert choose([], bound=7) == Choice(agent_id=7, matched=False)


def test_a_rule_to_the_default_agent_matches_and_unbinds() -> None:
    rules = [Rule.of(match="keyword", value="menu", agent_id=None)]

    assert choose(rules, bound=7, text="menu") == Choice(agent_id=None, matched=True)
