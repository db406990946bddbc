# The two commands of the README: `make demo` and `make test`.
# Both build .venv from nothing when it is missing or requirements.lock changed, and reuse it otherwise.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
LOCK_STAMP := $(VENV)/.lock-$(LOCK_HASH)
PKG_STAMP  := $(VENV)/.pkg-installed
OUT ?= out/demo

.PHONY: venv demo demo-quick test bench clean-venv cluster-deps

venv: $(PKG_STAMP)

# A new lock means a new environment: start from an empty venv so nothing stale survives.
$(LOCK_STAMP): requirements.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	# torch and torchvision normally, so their own runtime wheels come along ...
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# ... then everything else exactly as locked, without the resolver (see docs/install.md).
	$(BIN)/pip install -q --no-deps -r requirements.lock
	touch $@

$(PKG_STAMP): $(LOCK_STAMP) setup.cfg pyproject.toml
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	HF_HUB_OFFLINE=1 $(BIN)/python -m trainer.base.check_imports
	touch $@

demo: venv
	$(BIN)/latentverse demo out_dir=$(OUT)

demo-quick: venv
	$(BIN)/latentverse demo yamls/demo/quick.yaml out_dir=$(OUT)-quick

# The local Slurm of the cluster tests (tests/slurm_cluster.py), from Debian, when `make test` runs as root
# (CI does) and it is missing; elsewhere those tests skip, and .ci/run fails if they did.
cluster-deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! { command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd munge; \
	fi

test: venv cluster-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
