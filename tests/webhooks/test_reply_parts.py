"""A reply cut into the WhatsApp messages it is sent as (webhooks/reply_parts.py)."""

import pytest

from webhooks.reply_parts import Part, media_kind, reply_parts, typing_ms


def parts(text: str, *, split: bool = False, media_links: bool = True) -> list[Part]:
    return reply_parts(text=text, split=split, media_links=media_links)


def test_with_both_off_the_reply_is_one_text_exactly_as_written() -> None:
    text = "Olá!\n\n![x](https://cdn.example.com/a.png)"
    assert reply_parts(text=text, split=False, media_links=False) == [Part(text=text)]


def test_split_replies_cut_on_blank_lines_in_order() -> None:
    text = "Olá, Maria!\n\nTemos três planos:\n- básico\n- pro\n \n\nQual prefere?"
    assert [p.text for p in parts(text, split=True)] == [
        "Olá, Maria!",
        "Temos três planos:\n- básico\n- pro",
        "Qual prefere?",
    ]


def test_a_reply_without_media_links_goes_exactly_as_written() -> None:
    assert parts("  reply: ok \n") == [Part(text="  reply: ok \n")]


def test_a_single_line_break_does_not_split() -> None:
    assert [p.text for p in parts("a\nb", split=True)] == ["a\nb"]


def test_a_markdown_image_becomes_media_with_its_alt_text_and_the_text_around_stays() -> None:
    text = "Aqui está o catálogo:\n![Catálogo 2026](https://cdn.example.com/catalogo.jpg)\nGostou?"
    before, image, after = parts(text)
    assert before == Part(text="Aqui está o catálogo:")
    assert image == Part(
        text="Catálogo 2026",
        media_url="https://cdn.example.com/catalogo.jpg",
        mediatype="image",
        mimetype="image/jpeg",
        file_name="catalogo.jpg",
    )
    assert after == Part(text="Gostou?")


def test_a_markdown_link_to_a_file_becomes_a_document_with_the_link_text_as_caption() -> None:
    [document] = parts("[Contrato](https://files.example.com/docs/contrato%20final.pdf)")
    assert (document.mediatype, document.mimetype) == ("document", "application/pdf")
    assert (document.text, document.file_name) == ("Contrato", "contrato final.pdf")


def test_a_markdown_link_to_a_page_stays_text() -> None:
    text = "Veja [nosso site](https://example.com/planos) para detalhes."
    assert parts(text) == [Part(text=text)]


def test_a_markdown_image_without_a_known_extension_is_still_an_image() -> None:
    [image] = parts("![gráfico](https://charts.example.com/render?id=7)")
    assert image.mediatype == "image"


def test_a_bare_media_url_becomes_media_and_the_punctuation_after_it_goes_with_it() -> None:
    before, video, after = parts("O vídeo: https://cdn.example.com/demo.MP4. Até logo!")
    assert before.text == "O vídeo:"
    assert (video.media_url, video.mediatype, video.text) == (
        "https://cdn.example.com/demo.MP4",
        "video",
        "",
    )
    assert after.text == "Até logo!"


def test_a_bare_url_to_a_page_stays_in_the_text() -> None:
    text = "Acesse https://example.com/agenda ou responda aqui."
    assert parts(text) == [Part(text=text)]


def test_an_audio_link_goes_without_a_caption_as_whatsapp_shows_none() -> None:
    [audio] = parts("[ouça](https://cdn.example.com/resposta.mp3)")
    assert (audio.mediatype, audio.text, audio.mimetype) == ("audio", "", "audio/mpeg")


def test_media_links_off_keeps_links_in_the_text_and_still_splits() -> None:
    text = "![a](https://cdn.example.com/a.png)\n\nfim"
    assert [p.text for p in parts(text, split=True, media_links=False)] == [
        "![a](https://cdn.example.com/a.png)",
        "fim",
    ]


def test_split_and_media_together_keep_the_written_order() -> None:
    text = "Um\n\nDois ![foto](https://cdn.example.com/f.webp) Três\n\nQuatro"
    assert [(p.text, p.mediatype) for p in parts(text, split=True)] == [
        ("Um", ""),
        ("Dois", ""),
        ("foto", "image"),
        ("Três", ""),
        ("Quatro", ""),
    ]


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://x.test/a.png?size=large", "image"),
        ("https://x.test/a.ogg", "audio"),
        ("https://x.test/a.xlsx", "document"),
        ("https://x.test/a.html", ""),
        ("https://x.test/", ""),
    ],
)
def test_the_media_kind_comes_from_the_paths_extension(url: str, kind: str) -> None:
    assert media_kind(url) == kind


@pytest.mark.parametrize(
    ("length", "ms_per_char", "expected"),
    [(10, 0, 0), (10, 50, 1000), (40, 50, 2000), (1000, 50, 8000)],
)
def test_typing_lasts_the_parts_length_times_the_setting_clamped_to_1_to_8_seconds(
    length: int, ms_per_char: int, expected: int
) -> None:
    assert typing_ms(part=Part(text="x" * length), ms_per_char=ms_per_char) == expected
