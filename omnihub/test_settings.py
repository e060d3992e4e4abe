"""Settings for the test suite: the real settings, isolated from a developer's .env."""

import os

os.environ["ENV_FILE"] = ""
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
# Tenant secrets are encrypted in the tests as on a `make run` install.
os.environ.setdefault("OMNIHUB_ENCRYPTION_KEY", "dGVzdC1rZXktbm90LWZvci1wcm9kdWN0aW9uLTMyYiE=")

from omnihub.settings import *  # noqa: F403

# Manifest storage needs collectstatic; live_server tests serve from the apps.
STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
OMNIHUB_API_KEY = "test-api-key"
# The embedded worker is started by the tests that need it, not by live_server.
OMNIHUB_EMBEDDED_WORKER = False
# Database work runs on the test's own thread, inside its transaction.
DB_GROUP_COMMIT = False

# `make test` runs the pipeline's tests once more as production runs them
# (TEST_GROUP_COMMIT=true): every database call of the webhook view and the
# worker on the group committer's own thread and connection. A second
# connection cannot share an in-memory SQLite database without its table
# locks, so that pass uses a file, in WAL mode like production's.
if os.environ.get("TEST_GROUP_COMMIT") == "true":
    DB_GROUP_COMMIT = True
    if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
        import tempfile

        DATABASES["default"]["TEST"] = {  # noqa: F405
            "NAME": os.path.join(tempfile.gettempdir(), f"omnihub-test-{os.getpid()}.sqlite3")
        }
