""".env.example lists every setting the hub reads from the environment, and no other."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# env("X"), env.bool("X", ...), env.db("X", ...), os.environ.get("X")...
READ = re.compile(r"""(?:env(?:\.\w+)?|os\.environ(?:\.get)?)[(\[]\s*["']([A-Z][A-Z0-9_]+)["']""")
# Read by the test settings only: not a setting of the hub.
TEST_ONLY = {"TEST_GROUP_COMMIT"}


def variables_read() -> set[str]:
    names: set[str] = set()
    for folder in ("omnihub", "instances", "webhooks"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(READ.findall(path.read_text()))
    return names - TEST_ONLY


def variables_listed() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    assigned = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    # ENV_FILE cannot be set from the file it names: only mentioned there.
    return assigned | ({"ENV_FILE"} if "ENV_FILE" in text else set())


def test_env_example_lists_every_variable_the_hub_reads() -> None:
    assert variables_read() - variables_listed() == set()


def test_env_example_lists_no_variable_the_hub_ignores() -> None:
    assert variables_listed() - variables_read() == set()
