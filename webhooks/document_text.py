"""The text of a document a user sent, for agents that read text: plain text
decoded, a PDF's text extracted with pypdf, both bounded (a 300-page manual
must not become one prompt, nor take the worker's time)."""

import io
import logging

from pypdf import PdfReader
from pypdf.errors import PyPdfError

MAX_PAGES = 20
MAX_CHARS = 20_000
TEXT_TYPES = ("text/", "application/json", "application/csv", "application/xml")

logger = logging.getLogger(__name__)


def document_text(
    *, data: bytes, mime_type: str, max_pages: int = MAX_PAGES, max_chars: int = MAX_CHARS
) -> str | None:
    """The document's text, cut at max_chars (marked "[…]"); None for a type the
    hub cannot read or a file it cannot parse."""
    mime = mime_type.split(";", 1)[0].strip().lower()
    if mime == "application/pdf":
        text = _pdf_text(data, max_pages=max_pages, max_chars=max_chars)
    elif mime.startswith(TEXT_TYPES):
        text = data[: max_chars * 4].decode("utf-8", errors="replace")
    else:
        return None
    if text is None:
        return None
    text = text.strip()
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + " […]"


def _pdf_text(data: bytes, *, max_pages: int, max_chars: int) -> str | None:
    try:
        reader = PdfReader(io.BytesIO(data))
        pages: list[str] = []
        length = 0
        for number, page in enumerate(reader.pages):
            if number >= max_pages or length > max_chars:
                pages.append(f"[… {len(reader.pages) - number} more pages]")
                break
            page_text = page.extract_text() or ""
            pages.append(page_text)
            length += len(page_text)
        return "\n\n".join(pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        # A broken or encrypted PDF reaches the agent as a description instead.
        logger.info("pdf not read: %s", type(exc).__name__)
        return None
