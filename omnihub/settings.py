"""Settings for omnihub.

Every value comes from the process environment, which wins over an optional
``.env`` file in the project root (see ``.env.example`` for the full list).
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# read_env never overrides variables already set in the process environment.
# ENV_FILE="" skips the file (the test settings do, to stay independent of it).
_env_file = env.str("ENV_FILE", default=str(BASE_DIR / ".env"))
if _env_file:
    environ.Env.read_env(_env_file, overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY in the environment or in .env "
            "(`make run` writes a random one to .env for a local start), "
            "or set DEBUG=true for development."
        )
    SECRET_KEY = "insecure-development-only-key"

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="http://127.0.0.1:8000").rstrip("/")

# --- HTTPS (README "Security": what a public deployment sets) ---------------
# Off by default so that `make run` works on plain http://127.0.0.1.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# Machine endpoints are not redirected: Evolution and health checkers do not
# follow a redirect of their request, and the redirect would come after the
# token was sent anyway. (Under uvicorn /webhook/ and /health skip the
# middleware altogether, see omnihub/asgi.py; this covers /metrics and WSGI.)
SECURE_REDIRECT_EXEMPT = [r"^webhook/", r"^health(/|$)", r"^metrics$"]
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# Behind a TLS-terminating proxy that sets (overwrites) X-Forwarded-Proto, so
# that Django knows the request came in over https. Never without such a proxy:
# any client could then claim https.
if env.bool("TRUST_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# e.g. security.W005,security.W021 to keep HSTS off subdomains and preload lists.
SILENCED_SYSTEM_CHECKS = env.list("SILENCED_SYSTEM_CHECKS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_typer",
    "instances",
    "webhooks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The middleware of /webhook/ and /health (see omnihub/asgi.py): none of the
# session, auth, CSRF or messages machinery, which costs more than the view.
LEAN_MIDDLEWARE: list[str] = []

ROOT_URLCONF = "omnihub.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "omnihub" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "omnihub.asgi.application"

# --- Database -------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
_db = DATABASES["default"]
# Persistent connections leak under ASGI (each request may run in another
# thread); pooling is done by psycopg's pool on PostgreSQL instead.
_db["CONN_MAX_AGE"] = 0
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db.setdefault("OPTIONS", {}).update(
        {
            # IMMEDIATE takes the write lock at BEGIN, so read-then-write
            # transactions from two processes wait instead of failing with
            # "database is locked" half-way through.
            "transaction_mode": "IMMEDIATE",
            # Seconds a writer waits for the lock before "database is locked".
            "timeout": env.int("SQLITE_BUSY_TIMEOUT", default=20),
            # WAL lets readers run while one writer writes; synchronous=NORMAL
            # is durable against a crash of the process (not of the machine).
            # The database thread keeps its connection: a 64 MiB page cache (the
            # default is 2 MiB) holds the indexes a month's inbox writes into,
            # and reads through mmap share the OS's cache between processes.
            "init_command": (
                "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;"
                "PRAGMA cache_size=-65536;PRAGMA mmap_size=268435456;"
            ),
        }
    )
elif _db["ENGINE"] in ("django.db.backends.postgresql",):
    _db.setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DB_POOL_MIN_SIZE", default=2),
        "max_size": env.int("DB_POOL_MAX_SIZE", default=20),
        "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),
    }
    _db["DISABLE_SERVER_SIDE_CURSORS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

# --- Static files (served by WhiteNoise under uvicorn) ---------------------
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": env.str(
            "STATICFILES_STORAGE",
            default="whitenoise.storage.CompressedManifestStaticFilesStorage",
        )
    },
}

# WhiteNoise serves files from STATIC_ROOT (`make run` runs collectstatic);
# true serves them from the apps directly, for test servers without that step.
WHITENOISE_USE_FINDERS = env.bool("WHITENOISE_USE_FINDERS", default=False)

# Webhooks carry base64 media (a 16 MB video is ~22 MB of JSON); a valid
# delivery must never be refused for its size.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("WEBHOOK_MAX_BODY_BYTES", default=64 * 1024 * 1024)

# --- REST API ---------------------------------------------------------------
OMNIHUB_API_KEY = env.str("OMNIHUB_API_KEY", default="")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "instances.authentication.ApiKeyAuthentication",
        "instances.authentication.SendKeyAuthentication",
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["instances.permissions.HubPermission"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "instances.schema.HubAutoSchema",
    "EXCEPTION_HANDLER": "instances.api_errors.exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "omnihub API",
    "DESCRIPTION": "Tenants and message log of the omnihub WhatsApp-to-agent hub.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # The outbound messages' status, apart from the inbound messages' one.
    "ENUM_NAME_OVERRIDES": {
        "StatusEnum": "webhooks.models.Status",
        "OutboundStatusEnum": "webhooks.models.OutboundStatus",
    },
}

# --- Security ----------------------------------------------------------------
# Fernet keys for the tenants' secrets at rest, comma-separated: the first
# encrypts, all decrypt (rotation: instances/crypto.py, `manage.py rotate_secrets`).
# Unset: secrets are stored in plain text (`make run` writes a key to .env).
OMNIHUB_ENCRYPTION_KEYS = [
    key.strip() for key in env.list("OMNIHUB_ENCRYPTION_KEY", default=[]) if key.strip()
]
# Outbound calls (tenants' Evolution and agent URLs) to loopback, RFC 1918,
# CGNAT, ULA and unspecified addresses. Link-local and cloud metadata addresses
# are refused whatever this says. Turn it off when no tenant's server runs on
# the hub's own host or network (a hub whose tenants are set by others).
OUTBOUND_ALLOW_PRIVATE = env.bool("OUTBOUND_ALLOW_PRIVATE", default=True)
# The most an agent or Evolution answer may hold; a larger one fails the call.
OUTBOUND_MAX_RESPONSE_BYTES = env.int("OUTBOUND_MAX_RESPONSE_BYTES", default=1024 * 1024)

# --- Legacy single-tenant variables (seed the default instance) ------------
AGENT_API_URL = env.str("AGENT_API_URL", default="http://localhost:8000")
AGENT_API_KEY = env.str("AGENT_API_KEY", default="")
DEFAULT_AGENT_NAME = env.str("DEFAULT_AGENT_NAME", default="simple_agent")
AGENT_API_TIMEOUT = env.int("AGENT_API_TIMEOUT", default=60)
WHATSAPP_INSTANCE = env.str("WHATSAPP_INSTANCE", default="")
SESSION_ID_PREFIX = env.str("SESSION_ID_PREFIX", default="")
EVOLUTION_API_URL = env.str("EVOLUTION_API_URL", default="")
EVOLUTION_API_KEY = env.str("EVOLUTION_API_KEY", default="")
WEBHOOK_TOKEN = env.str("WEBHOOK_TOKEN", default="")
# Hours a replaced webhook token is still accepted: Evolution's retries carry
# the old one, and it drops a delivery for good on 401.
WEBHOOK_TOKEN_GRACE_HOURS = env.float("WEBHOOK_TOKEN_GRACE_HOURS", default=24.0)

# --- Pipeline ----------------------------------------------------------------
OMNIHUB_EMBEDDED_WORKER = env.bool("OMNIHUB_EMBEDDED_WORKER", default=True)
WORKER_CONCURRENCY = env.int("WORKER_CONCURRENCY", default=64)
WORKER_POLL_INTERVAL = env.float("WORKER_POLL_INTERVAL", default=1.0)
WORKER_SHUTDOWN_GRACE = env.float("WORKER_SHUTDOWN_GRACE", default=20.0)
# The webhook's and the worker's database work runs on one thread per process
# with a long-lived connection, many calls per commit; see webhooks/db.py.
DB_GROUP_COMMIT = env.bool("DB_GROUP_COMMIT", default=True)
WORKER_LEASE_MARGIN = env.float("WORKER_LEASE_MARGIN", default=30.0)
MESSAGE_MAX_AGE = env.int("MESSAGE_MAX_AGE", default=600)
# `manage.py prune_messages` deletes finished messages older than this by default.
MESSAGE_RETENTION_DAYS = env.int("MESSAGE_RETENTION_DAYS", default=30)
AGENT_MAX_ATTEMPTS = env.int("AGENT_MAX_ATTEMPTS", default=4)
EVOLUTION_RETRY_WINDOW = env.int("EVOLUTION_RETRY_WINDOW", default=900)
EVOLUTION_TIMEOUT = env.float("EVOLUTION_TIMEOUT", default=15.0)
# The outbox (API and operator sends, webhooks/dispatcher.py): run by every worker;
# at most this many instances' outboxes drained at once per worker.
OUTBOX_DISPATCHER = env.bool("OUTBOX_DISPATCHER", default=True)
OUTBOX_CONCURRENCY = env.int("OUTBOX_CONCURRENCY", default=64)
# "typing..." is shown once the agent has worked this long (seconds): a reply
# that comes sooner needs none, and its presence could land after the reply.
TYPING_AFTER = env.float("TYPING_AFTER", default=0.5)
# /health/ready answers 503 when no worker has been heard from for this long.
HEALTH_WORKER_MAX_SILENCE = env.int("HEALTH_WORKER_MAX_SILENCE", default=30)
# /metrics: when METRICS_TOKEN is set, only a request with "Authorization:
# Bearer <METRICS_TOKEN>" (METRICS_ALLOW and the API key no longer count: behind
# a local proxy every client is loopback). Unset: clients in METRICS_ALLOW, or
# with header x-api-key.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_ALLOW = env.list("METRICS_ALLOW", default=["127.0.0.1/32", "::1/128"])
RETRY_BASE_DELAY = env.float("RETRY_BASE_DELAY", default=2.0)
RETRY_MAX_DELAY = env.float("RETRY_MAX_DELAY", default=60.0)
# Status callbacks (webhooks/callbacks.py): attempts before one is given up, how many are
# in flight at once per worker process, each one's timeout.
CALLBACK_MAX_ATTEMPTS = env.int("CALLBACK_MAX_ATTEMPTS", default=8)
CALLBACK_CONCURRENCY = env.int("CALLBACK_CONCURRENCY", default=8)
CALLBACK_TIMEOUT = env.float("CALLBACK_TIMEOUT", default=10.0)

LOG_FORMAT = env.str("LOG_FORMAT", default="plain")  # "plain" or "json"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "omnihub.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "httpx": {"level": "WARNING"},
    },
}
