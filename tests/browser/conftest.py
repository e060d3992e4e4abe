"""Browser fixtures: the operator console in headless Chromium against a real hub server.

The hub runs as a uvicorn subprocess with its embedded worker (tests/e2e/harness.py),
on a SQLite file of its own, next to a fake Evolution and a fake agent on 127.0.0.1.
Chromium is Debian's (/usr/bin/chromium, `apt-get install chromium`); Playwright
only drives it, so `playwright install` is never needed. Every screen a test looks at
is saved under test-artifacts/browser/; UPDATE_SCREENSHOTS=1 also copies the ones the
README shows to docs/screenshots/.
"""

import os
import random
import shutil
import struct
import zlib
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, Playwright, Response, sync_playwright

from tests.e2e.harness import Hub
from tests.fakes import QR_DATA_URL, Answer, FakeAgent, FakeEvolution, Recorded

BROWSER_DIR = Path(__file__).parent
PROJECT = BROWSER_DIR.parents[1]
ARTIFACTS = PROJECT / "test-artifacts" / "browser"
README_SCREENSHOTS = PROJECT / "docs" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USERNAME = "operator"
PASSWORD = "console-password-4821"
# An address like a deployment's, so the screenshots show a webhook URL worth pasting.
PUBLIC_BASE_URL = "https://hub.example.com"
# The fake agent's replies read "<prefix>: <what it was sent>".
AGENT_PREFIX = "Agent reply to"
# Playwright's waits, in milliseconds: the QR page polls every 3 s.
TIMEOUT_MS = 15_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives the admin in headless Chromium (deselect: -m 'not browser')"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROWSER_DIR in item.path.parents:
            item.add_marker(pytest.mark.browser)


# --- a QR code to look at -------------------------------------------------------
def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def qr_like_png(*, modules: int = 25, scale: int = 8, border: int = 4) -> bytes:
    """A grey-scale PNG that looks like a QR code (finder, timing and alignment
    patterns around seeded noise); it does not decode to anything."""
    noise = random.Random(7)
    grid = [[noise.random() < 0.5 for _ in range(modules)] for _ in range(modules)]

    def square(top: int, left: int, size: int) -> None:
        # Concentric rings: dark, light, ... with a dark centre, plus a light margin.
        for row in range(top - 1, top + size + 1):
            for col in range(left - 1, left + size + 1):
                if 0 <= row < modules and 0 <= col < modules:
                    ring = min(row - top, col - left, top + size - 1 - row, left + size - 1 - col)
                    grid[row][col] = (ring >= 0 and ring % 2 == 0) or ring >= 2

    for index in range(8, modules - 8):
        grid[6][index] = grid[index][6] = index % 2 == 0
    for top, left in ((0, 0), (0, modules - 7), (modules - 7, 0)):
        square(top, left, 7)
    square(modules - 9, modules - 9, 5)

    side = (modules + 2 * border) * scale
    lines = []
    for y in range(side):
        row = y // scale - border
        pixels = bytes(
            0 if 0 <= row < modules and 0 <= col < modules and grid[row][col] else 255
            for col in (x // scale - border for x in range(side))
        )
        lines.append(b"\x00" + pixels)
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"".join(lines)))
        + _png_chunk(b"IEND", b"")
    )


QR_PICTURE = "data:image/png;base64," + b64encode(qr_like_png()).decode()


def show_qr_picture(evolution: FakeEvolution) -> None:
    """Make the fake answer QR_PICTURE: its own 1x1 PNG, stretched, shows a blank square."""
    answer = evolution.respond

    def respond(record: Recorded) -> Answer:
        status, body = answer(record)
        if isinstance(body, dict) and body.get("base64") == QR_DATA_URL:
            body = {**body, "base64": QR_PICTURE}
        return status, body

    evolution.respond = respond


# --- the hub and its fakes --------------------------------------------------------
@dataclass
class Fakes:
    evolution: FakeEvolution
    agent: FakeAgent


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    evolution = FakeEvolution().start()
    show_qr_picture(evolution)
    agent = FakeAgent(prefix=AGENT_PREFIX).start()
    yield Fakes(evolution=evolution, agent=agent)
    evolution.stop()
    agent.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub server with its embedded worker and a superuser."""
    started = Hub(
        workdir=tmp_path_factory.mktemp("browser-hub"),
        env={"PUBLIC_BASE_URL": PUBLIC_BASE_URL, "DJANGO_SUPERUSER_PASSWORD": PASSWORD},
    )
    with started:
        started.migrate()
        started.manage(
            "createsuperuser", "--noinput", "--username", USERNAME, "--email", "op@example.com"
        )
        started.start(servers=1)
        yield started


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        # Failing, not skipping: CI installs Chromium, so a missing one is a broken setup.
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run `apt-get install -y chromium` "
            "(.ci/run does) or point CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    playwright: Playwright = sync_playwright().start()
    try:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()
    finally:
        playwright.stop()


# --- the console --------------------------------------------------------------------
@dataclass
class Console:
    """A logged-in admin tab; every screenshot also checks what a person would notice."""

    page: Page
    url: str
    secrets: list[str] = field(default_factory=list)
    # Failed requests (a missing stylesheet or icon), JavaScript errors.
    problems: list[str] = field(default_factory=list)

    def open(self, path: str) -> None:
        response = self.page.goto(self.url + path)
        assert response is not None and response.ok, f"{path}: {response and response.status}"

    def shot(self, name: str, *, readme: bool = False, shown_secrets: tuple[str, ...] = ()) -> Path:
        """Save the whole page as test-artifacts/browser/<name>.png after checking it is
        styled, free of request and script errors, tracebacks and secrets."""
        self.page.wait_for_load_state("load")
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if readme and os.environ.get("UPDATE_SCREENSHOTS"):
            README_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, README_SCREENSHOTS / path.name)
        assert self.problems == [], f"{name}: {self.problems}"
        assert self.styled(), f"{name}: the admin stylesheet did not apply"
        html = self.page.content()
        assert "Traceback" not in html and "Server Error" not in html, name
        leaked = [s for s in self.secrets if s in html and s not in shown_secrets]
        assert leaked == [], f"{name} shows a secret"
        return path

    def styled(self) -> bool:
        # Unstyled, the admin's header has no background colour.
        background = self.page.evaluate(
            "getComputedStyle(document.getElementById('header')).backgroundColor"
        )
        return background not in ("", "transparent", "rgba(0, 0, 0, 0)")

    def webhook_token(self) -> str:
        """The token, as an operator reads it off the change page's webhook URL."""
        url = self.page.locator(".field-webhook_url_with_token_display .readonly").inner_text()
        return parse_qs(urlsplit(url.strip()).query)["token"][0]


@pytest.fixture(scope="module")
def console(browser: Browser, hub: Hub) -> Iterator[Console]:
    """The admin, logged in through its login page."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    made = Console(page=page, url=hub.server.url, secrets=[PASSWORD])
    page.on("pageerror", lambda error: made.problems.append(f"script error: {error}"))
    page.on("requestfailed", lambda request: made.problems.append(f"failed: {request.url}"))

    def failed_response(response: Response) -> None:
        # The admin has no favicon; Chromium asks for one anyway.
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):
            made.problems.append(f"{response.status}: {response.url}")

    page.on("response", failed_response)

    made.open("/admin/")
    assert "/admin/login/" in page.url
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    made.shot("login")
    page.click("input[type=submit]")
    page.wait_for_url(f"{made.url}/admin/")
    assert page.locator("#site-name").is_visible()
    made.shot("admin-home")
    yield made
    context.close()
