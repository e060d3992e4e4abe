"""A document's text for agents that read text: plain text and PDF, bounded."""

from tests.pdf_files import pdf_with_pages
from webhooks.document_text import document_text


def test_a_pdfs_text_is_extracted_page_by_page() -> None:
    pdf = pdf_with_pages("Invoice 2026-114", "Total: R$ 350,00")

    text = document_text(data=pdf, mime_type="application/pdf")

    assert text is not None
    assert "Invoice 2026-114" in text and "Total: R$ 350,00" in text
    assert text.index("Invoice") < text.index("Total")


def test_a_long_pdf_stops_after_max_pages_and_says_how_many_are_left() -> None:
    pdf = pdf_with_pages(*(f"page {n}" for n in range(1, 8)))

    text = document_text(data=pdf, mime_type="application/pdf", max_pages=3)

    assert text is not None
    assert "page 3" in text and "page 4" not in text
    assert text.endswith("[… 4 more pages]")


def test_the_text_is_cut_at_max_chars() -> None:
    text = document_text(data=b"a" * 500, mime_type="text/plain; charset=utf-8", max_chars=100)

    assert text == "a" * 100 + " […]"


def test_plain_text_is_decoded_as_utf8_even_when_broken() -> None:
    assert document_text(data="preço\n".encode() + b"\xff", mime_type="text/csv") == "preço\n\ufffd"


def test_a_broken_pdf_and_an_unknown_type_have_no_text() -> None:
    assert document_text(data=b"%PDF-1.4 not really", mime_type="application/pdf") is None
    assert document_text(data=b"PK\x03\x04", mime_type="application/zip") is None
