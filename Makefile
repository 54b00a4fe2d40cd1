# lazysnap: one command to set up and test, on a fresh Debian 12 machine, as root.
#   make demo         a realistic image (python3 + numpy) started from a full pull and lazily through
#                     lazysnap, side by side over a 100 Mbit/s link: time to ready, MB fetched, speed-up
#   make test         install what is missing (Debian packages, .venv), then run every test tier
#   make unit | integration | e2e    one tier
#   make proto        regenerate snapshotter/api from proto/*.proto (committed; a test checks it)
#   make lint         ruff
#   make bench-registry   range reads through lazysnap's registry client vs curl (about a minute)
#   make bench-convert    lazysnap convert vs ctr-remote, same image (about 15 minutes)
#   make bench-fuse       lazysnap mount vs native ext4 (about 3 minutes, root)
#   make bench-index      index build time and memory for a 100,000-entry TOC
#   make bench-snapshotter  snapshots service RPC latency (1,000 snapshots, 50 callers), full pull vs overlayfs
#   make bench-restart    how long readers of lazy files pause when the daemon is killed, restarted or
#                         upgraded in place (about 3 minutes, root)
#   make bench-startup    time to ready of realistic images: full pull vs lazysnap (plain and optimized),
#                         100 Mbit/s, 3 repeats (the full matrix: 20-30 minutes with image builds);
#                         BENCH_ARGS="--delay-ms 20 --out ..." or "--rate unlimited --out ..." for the others
SHELL := /bin/bash
.DEFAULT_GOAL := test

APT_PACKAGES := containerd runc fuse3 libfuse3-dev pkg-config docker-registry stargz-snapshotter \
                skopeo umoci busybox-static iproute2 gcc libc6-dev zlib1g-dev pigz flatbuffers-compiler
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest

.PHONY: test demo unit integration e2e deps bench-deps system-deps proto lint clean bench-startup bench-registry bench-convert bench-fuse \
        bench-index bench-snapshotter bench-restart

test: deps
	$(PYTEST) tests

# Everything `make test` needs, plus debootstrap and matplotlib for building and charting real images.
bench-deps: deps
	@dpkg-query -W -f='$${Status}\n' debootstrap 2>/dev/null | grep -q '^install ok installed$$' || { \
	    echo "installing Debian packages: debootstrap"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }; }
	@$(PY) -c 'import matplotlib' 2>/dev/null || { echo "installing matplotlib into $(VENV)"; \
	    $(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'; }

# The peer snapshotter (stargz-snapshotter's containerd-stargz-grpc, ../shared/peer) joins as mode
# "stargz" when it is there (--peer auto prints a note and skips it otherwise; CI does not need it).
demo: bench-deps
	$(PY) -m bench.harness --images python-numpy --modes overlayfs,lazysnap --peer auto --repeat 1 \
	    --rate 100mbit --out bench/results/demo

# Lazy modes run on both converters' images: lazysnap convert and ctr-remote image convert --estargz.
bench-startup: bench-deps
	$(PY) -m bench.harness --images python-numpy,python-numpy-umoci,python-scipy,jre,gcc,node,big-app \
	    --modes overlayfs,lazysnap,lazysnap-optimized --peer auto --converters lazysnap,ctr-remote \
	    --repeat 3 --rate 100mbit --out bench/results/startup $(BENCH_ARGS)

bench-restart: deps
	$(PY) -m bench.restart --repeat 10 --out bench/results/restart

unit: deps
	$(PYTEST) tests/unit

integration: deps
	$(PYTEST) tests/integration

e2e: deps
	$(PYTEST) tests/e2e

deps: system-deps $(STAMP)

# Installs only the Debian packages that are missing, and says which.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run as root to install them)"; exit 1; fi; \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@modprobe fuse 2>/dev/null || true; modprobe overlay 2>/dev/null || true

# The venv is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then echo "creating $(VENV)"; python3 -m venv $(VENV); fi
	@echo "installing lazysnap and its test dependencies into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

bench-registry: deps
	$(PY) -m bench.registry_ranges

bench-convert: deps
	$(PY) -m bench.convert

bench-fuse: deps
	$(PY) -m bench.fuse_read

bench-index: deps
	$(PY) -m bench.index_build

bench-snapshotter: deps
	$(PY) -m bench.snapshotter_rpc

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check snapshotter fuse proto tests bench
	$(VENV)/bin/ruff format --check snapshotter fuse proto tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
