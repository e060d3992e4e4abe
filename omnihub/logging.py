"""Log line helpers: `key=value` fields (kv) and one JSON object per line (LOG_FORMAT=json)."""

import contextlib
import json
import logging
import re
from datetime import UTC, datetime

# Besides non-printable characters (newlines...), what makes a bare value ambiguous.
_SPECIAL = re.compile(r'[\s"=\\]')
# key=value or key="quoted \"value\"" (JSON string syntax), as kv() writes them.
_FIELD = re.compile(r'(?:^|\s)([A-Za-z_]\w*)=("(?:[^"\\]|\\.)*"|\S*)')


def _quote(text: str) -> str:
    quoted = json.dumps(text, ensure_ascii=False)
    # json.dumps leaves non-printable characters beyond ASCII (e.g. U+2028, a line
    # separator to some viewers) as they are: escape them too, JSON-style.
    return "".join(ch if ch.isprintable() else json.dumps(ch)[1:-1] for ch in quoted)


def kv_value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and not _SPECIAL.search(text):
        return text
    return _quote(text)


def kv(**fields: object) -> str:
    """`key=value` pairs, in order; None values are left out. A value with a space,
    a quote, '=', a backslash or a control character is written as a JSON string,
    so a message id like 'x status=replied' or one with a newline cannot forge a
    field or a line."""
    pairs = (f"{key}={kv_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(pairs)


def parse_kv(text: str) -> dict[str, str]:
    """The fields of a line written with kv() (the first of a repeated key wins)."""
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(text):
        if value.startswith('"'):
            with contextlib.suppress(ValueError):  # cut short: keep it as written
                value = json.loads(value)
        fields.setdefault(key, value)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Pipeline lines are "key=value" pairs (omnihub.logging.kv); lift them into fields.
        for key, value in parse_kv(line["message"]).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)
