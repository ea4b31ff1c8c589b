# Stratus. `make run` serves the demo site; `make test` runs the whole suite.
# Both install what they need on a fresh Debian 12 machine (root or sudo).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export SITE_URL ?= http://$(HOST):$(PORT)

IMAGE_DIR ?= /var/lib/stratus/images
export STRATUS_IMAGE_DIR := $(IMAGE_DIR)

.PHONY: run test lint format system-run system-test migrate demo serve image clean second-host second-host-stop

run: system-run $(VENV)/.run-deps node_modules/.installed image migrate demo serve

# The suite runs on SQLite and, when a server answers on 127.0.0.1:5432 (as on CI), at the
# same time on PostgreSQL: that pass keeps to what may differ by database (tests/conftest.py)
# and is done long before the SQLite pass's guests, so it costs no wall time. Its output is
# kept in test-artifacts/ and printed after the SQLite pass's; its guests take other SSH
# ports. PG_TEST_URL names the database (pytest-django creates test_<name>).
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/stratus
PG_TEST_LOG := test-artifacts/postgres-pass.log

test: system-test $(VENV)/.dev-deps node_modules/.installed lint image
	@mkdir -p test-artifacts; pg=""; \
	if (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then \
	  echo "== the PostgreSQL pass ($(PG_TEST_URL)) runs beside this one: $(PG_TEST_LOG)"; \
	  DATABASE_URL=$(PG_TEST_URL) STRATUS_IT_SSH_PORTS=24400 $(PY) -m pytest \
	    > $(PG_TEST_LOG) 2>&1 & pg=$$!; \
	else \
	  echo "No PostgreSQL on 127.0.0.1:5432: the PostgreSQL pass is skipped."; \
	fi; \
	$(PY) -m pytest; sqlite=$$?; \
	postgres=0; \
	if [ -n "$$pg" ]; then \
	  wait $$pg; postgres=$$?; \
	  echo "== the same suite on PostgreSQL ($(PG_TEST_URL)), run beside the SQLite pass"; \
	  cat $(PG_TEST_LOG); \
	fi; \
	[ $$sqlite -eq 0 ] && [ $$postgres -eq 0 ]

system-run:
	@scripts/setup-system.sh run
	@scripts/setup-libvirt.sh

system-test:
	@scripts/setup-system.sh test
	@scripts/setup-libvirt.sh

# The Debian 12 base image guests boot from (built once, then reused; docs/base-image.md).
image: $(VENV)/.run-deps
	$(PY) manage.py build_image debian-12 --dest $(IMAGE_DIR) --no-register

# noVNC from the npm registry, pinned by package-lock.json; served as /static/novnc/.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	touch $@

$(VENV)/bin/python:
	"$$(scripts/find-python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.run-deps: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.run-deps

lint: $(VENV)/.dev-deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev-deps
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

migrate:
	$(PY) manage.py migrate --no-input

# The demo course, its people (new passwords each time) and the approved "Demo group"
# whose VM the worker boots once `serve` starts it; its SSH key is var/demo_key.
demo:
	$(PY) manage.py load_demo --image $(IMAGE_DIR)/debian-12.qcow2

# web, worker and beat from the Procfile, in the foreground. Logs are text for the
# terminal here (LOG_FORMAT=json gives what production writes). Ctrl-C leaves the demo VM
# running in libvirt: the next `make run` finds it (docs/operations.md).
LOG_FORMAT ?= text
# The console channel's key of `make second-host` (its sshd accepts only that key, for
# socket forwards only): the web process reads it when a console of local2 opens.
HV2_SSHD := /var/lib/stratus/hv2-sshd
HV2_CONSOLE_KEY := $(HV2_SSHD)/console_ed25519
serve:
	@echo "Stratus is at http://$(HOST):$(PORT)/  (Ctrl-C stops web, worker and beat)"
	WEB_HOST=$(HOST) WEB_PORT=$(PORT) LOG_FORMAT=$(LOG_FORMAT) CONSOLE_SSH_KEY=$(HV2_CONSOLE_KEY) \
	  $(VENV)/bin/honcho start -f Procfile

# A second hypervisor on this machine, to try moving VMs (docs/operations.md, "Moving a VM
# to another host"): its own libvirtd on 127.0.0.2 (scripts/second-libvirtd.sh), registered
# as host `local2` with its console channel (an sshd in that daemon's mount namespace on
# 127.0.0.2, labs/tooling/second_host_sshd.py), and its worker in the foreground. Run it
# beside `make run`; Ctrl-C stops the worker; `make second-host-stop` the sshd and the
# daemon (its VMs with it).
second-host: $(VENV)/.run-deps migrate
	@mkdir -p var && uri=$$(scripts/second-libvirtd.sh start) && \
	  mapfile -t console < <($(PY) -m labs.tooling.second_host_sshd start $(HV2_SSHD) \
	    --daemon-pid "$$(cat /var/lib/stratus/hv2/libvirtd.pid)" --log var/hv2-sshd.log) && \
	  { [[ $${#console[@]} -eq 3 ]] || { echo "no console sshd: see var/hv2-sshd.log" >&2; false; }; } && \
	  CONSOLE_SSH_KEY=$(HV2_CONSOLE_KEY) $(PY) manage.py register_host local2 --uri "$$uri" \
	    --virt-type qemu --storage-dir /var/lib/stratus/vms2 --ssh-ports 22100-22199 \
	    --published-ports 24000-24099 \
	    --console-ssh "$${console[0]}" --console-ssh-host-key "$${console[1]}" && \
	  $(VENV)/bin/celery -A portal worker --loglevel INFO --concurrency 1 \
	    -Q host.local2 -n local2@%h

second-host-stop: $(VENV)/.run-deps
	$(PY) -m labs.tooling.second_host_sshd stop $(HV2_SSHD)
	scripts/second-libvirtd.sh stop

# The database goes with var/; libvirt's domains do not (docs/operations.md, "The demo").
clean:
	@if virsh -q -c qemu:///system list --all --name 2>/dev/null | grep -q '^stratus-vm-'; then \
	  echo "Note: libvirt keeps the Stratus VMs of the database removed here (virsh list --all):"; \
	  echo "the next make run's demo VM would clash with their names. How to remove them:"; \
	  echo "docs/operations.md, \"The demo\"."; \
	fi
	rm -rf $(VENV) var
