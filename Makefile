# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2

.PHONY: run test test-sqlite test-postgres install bench clean example-db encryption-key

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# A Fernet key is 32 random bytes in url-safe base64 (no venv needed to make one).
FERNET_KEY = $$($(PYTHON) -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')

.env:
	@echo "SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > .env
	@echo "OMNIHUB_ENCRYPTION_KEY=$(FERNET_KEY)" >> .env
	@echo "Wrote a random SECRET_KEY and OMNIHUB_ENCRYPTION_KEY to .env (kept for later starts; without that key the tenants' secrets cannot be read)."

# An .env written before secrets were encrypted gets a key too, unless the
# environment sets one. The secrets already stored stay readable (plain);
# `manage.py rotate_secrets` encrypts them.
encryption-key: .env
	@if [ -z "$$OMNIHUB_ENCRYPTION_KEY" ] && ! grep -qs '^OMNIHUB_ENCRYPTION_KEY=.' .env; then \
		[ -z "$$(tail -c1 .env)" ] || echo >> .env; \
		echo "OMNIHUB_ENCRYPTION_KEY=$(FERNET_KEY)" >> .env; \
		echo "Added a random OMNIHUB_ENCRYPTION_KEY to .env: new tenant secrets are stored encrypted"; \
		echo "(run $(BIN)/python manage.py rotate_secrets to encrypt those already stored)."; \
	fi

run: install .env encryption-key
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	@if $(BIN)/python manage.py shell -v 0 -c "from django.conf import settings; raise SystemExit(0 if settings.AGENT_API_KEY else 1)" 2>/dev/null; then \
		$(BIN)/python manage.py seed_default_instance; \
	else echo "AGENT_API_KEY not set: no default instance seeded (legacy route answers 404)."; fi
	@echo ""
	@echo "omnihub on http://$(HOST):$(PORT)/  admin: http://$(HOST):$(PORT)/admin/  API docs: http://$(HOST):$(PORT)/api/docs/"
	@echo "Create an admin user with: $(BIN)/python manage.py createsuperuser"
	@echo ""
	@# PUBLIC_BASE_URL defaults to this address unless the environment or .env sets it.
	grep -qs '^PUBLIC_BASE_URL=' .env || export PUBLIC_BASE_URL=$${PUBLIC_BASE_URL:-http://$(HOST):$(PORT)}; \
	PROMETHEUS_MULTIPROC_DIR=$${PROMETHEUS_MULTIPROC_DIR:-$$(mktemp -d -t omnihub-metrics.XXXXXX)} \
		exec $(BIN)/uvicorn omnihub.asgi:application --host $(HOST) --port $(PORT) \
		--workers $(WORKERS) --lifespan on --no-access-log

# The suite runs on SQLite, then again on PostgreSQL (pytest-django creates and
# drops test_<name> there). .ci/run starts PostgreSQL when it is not running.
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/omnihub

test: install
	$(BIN)/ruff check .
	ENV_FILE= SECRET_KEY=check $(BIN)/python manage.py makemigrations --check --dry-run
	ENV_FILE= SECRET_KEY=check $(BIN)/python manage.py spectacular --validate --fail-on-warn --file /dev/null
	@$(BIN)/python -c "import psycopg; psycopg.connect('$(TEST_POSTGRES_URL)'.rsplit('/', 1)[0] + '/postgres', connect_timeout=5).close()" \
		|| { echo "PostgreSQL is not reachable at $(TEST_POSTGRES_URL): start it (.ci/run does), or set TEST_POSTGRES_URL."; exit 1; }
	@# The two passes side by side: the suite mostly waits (servers, sleeps, the
	@# browser), about half a core of the two; each pass's output is printed whole
	@# when it ends.
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-sqlite test-postgres

# SQLite pass: everything but the scale-out test, which is PostgreSQL's own; then the
# pipeline's tests again with production's database path: every call of the webhook and
# the worker on the group committer's thread (end-to-end tests run the real server,
# where it is always on).
test-sqlite: install
	TEST_POSTGRES_URL=$(TEST_POSTGRES_URL) $(BIN)/pytest -m "not scale_out"
	TEST_GROUP_COMMIT=true $(BIN)/pytest -m pipeline

# PostgreSQL pass: the suite again, without the browser tests (they drive a hub on
# SQLite) and the minute-long fault tests the SQLite pass runs.
test-postgres: install
	DATABASE_URL=$(TEST_POSTGRES_URL) $(BIN)/pytest -m "not browser and (scale_out or not slow)"
	DATABASE_URL=$(TEST_POSTGRES_URL) TEST_GROUP_COMMIT=true $(BIN)/pytest -m pipeline

clean:
	rm -rf $(VENV) staticfiles

# Benchmark (issue-sized numbers on loopback): writes bench/results.json and bench/results.md,
# then the same hub with 1,000,000 stored messages: bench/results-stored.{json,md}, then
# 5,000 API sends through the outbox: bench/results-outbox.{json,md}.
bench: install .env
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q wrk >/dev/null; } || { echo "install wrk (apt-get install wrk)"; exit 1; }
	$(BIN)/python bench/run.py
	$(BIN)/python bench/stored_inbox.py
	$(BIN)/python bench/outbox.py

# Rebuild db.sqlite3.example after adding a migration (tests/instances/test_example_db.py says when).
example-db: install
	rm -f db.sqlite3.example db.sqlite3.example-wal db.sqlite3.example-shm
	ENV_FILE= SECRET_KEY=x DATABASE_URL=sqlite:///$(CURDIR)/db.sqlite3.example $(BIN)/python manage.py migrate -v 0
	ENV_FILE= SECRET_KEY=x DATABASE_URL=sqlite:///$(CURDIR)/db.sqlite3.example $(BIN)/python manage.py shell -v 0 -c 'from django.db import connection; from instances.models import InstanceConfig as I; from instances.services import save_instance; save_instance(instance=I(name="example", evolution_url="https://evolution.example.com", evolution_key="example-evolution-key-replace-me", whatsapp_instance="example", agent_api_url="https://agent.example.com", agent_api_key="example-agent-key-replace-me", webhook_token="example-token-replace-me")); connection.cursor().execute("PRAGMA journal_mode=DELETE")'
