# Everything runs as root on Debian bookworm. `make demo` and `make test` set the machine up
# first (scripts/setup-host.sh: idempotent, a few seconds when already done).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit integration lint bench clean-tests hosts hosts-down

setup:
	bash scripts/setup-host.sh

demo: setup
	bash scripts/demo.sh

# The layers contract first (seconds): CI runs this target, so it keeps the floors.
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest tests -v -rfEs --durations=15

unit: setup
	$(PY) -m pytest tests/unit -q

integration: setup
	$(PY) -m pytest tests/integration -v -rfEs

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/bench_runtime.py
	$(PY) bench/bench_storage.py
	$(PY) bench/bench_transport.py
	$(PY) bench/bench_live.py
	$(PY) bench/bench_backup.py
	$(PY) bench/bench_schedule.py

# Two test hosts on this machine (network namespaces mh-a, mh-b joined by a private
# 198.51.100.0/24 link, each with its own sshd, state root, pools and busybox image):
# see testrigs/testhosts.py. Idempotent; `make hosts-down` removes everything.
# SHAPE=100mbit limits what host a sends on the link (tc tbf); SHAPE=off lifts it.
# NETWORK=shared (default): the hosts' container bridges are one network over VXLAN;
# NETWORK=isolated: each host's containers on its own bridge.
NETWORK ?= shared
hosts: setup
	$(PY) -m testrigs.testhosts up --hosts a,b --network $(NETWORK)
	$(if $(SHAPE),$(PY) -m testrigs.testhosts shape a $(SHAPE))

hosts-down:
	$(PY) -m testrigs.testhosts down

# Leftovers of an interrupted test run (hosts are normally torn down by the fixtures).
clean-tests: setup
	$(PY) scripts/clean_test_hosts.py
