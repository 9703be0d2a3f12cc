# Two commands that work on a fresh Debian machine (as root): `make demo` and `make test`.
# Each installs what it needs: Debian packages when missing, and a .venv with corral and its deps.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_CPU ?= 2.13.0
# Debian packages corral uses at run time (bubblewrap, nft, ip; gcc and libc6-dev build its static
# in-sandbox agent) and that tests drive as real clients or servers (chromium: the dashboard's browser
# test; postgresql: the server tests/test_postgres.py starts for the PostgreSQL store).
APT_PKGS := bubblewrap nftables iproute2 libseccomp2 python3 openssh-client openssl iputils-ping procps util-linux \
            skopeo umoci docker-registry busybox-static gcc libc6-dev chromium postgresql
# Everything runs in a private network namespace of its own: even a bug cannot reach the real network.
ISOLATED := unshare --net --mount --propagation private -- sh -c

.PHONY: all deps venv test demo bench peers redteam lint clean

all: test

deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU build of torch first (TRL's tests run a tiny model on the CPU): left to resolve itself,
	# TRL's plain 'torch' requirement would pull a CUDA build of several GB
	$(VENV)/bin/pip install -q torch==$(TORCH_CPU)
	# playwright drives Debian's chromium (APT_PKGS): it never downloads browsers of its own
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: deps venv
	$(ISOLATED) 'ip link set lo up && $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)'

demo: deps venv
	$(ISOLATED) 'ip link set lo up && $(VENV)/bin/corral demo'

# the peers corral is measured against (bench_images.py, bench_peers.py): Debian's, and two of their own
# under benchmarks/.peers (sandbox-runtime from npm, SWE-ReX from PyPI), never in corral's .venv
BENCH_APT := podman runc firejail socat ripgrep
PEERS := benchmarks/.peers

peers:
	@missing=""; for p in $(BENCH_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@test -x $(PEERS)/node/node_modules/.bin/srt || (command -v npm >/dev/null && npm install -s --prefix $(PEERS)/node @anthropic-ai/sandbox-runtime) || echo "no npm: sandbox-runtime is skipped"
	@test -x $(PEERS)/venv/bin/python || ($(PYTHON) -m venv $(PEERS)/venv && $(PEERS)/venv/bin/pip install -q swe-rex) || echo "SWE-ReX is skipped"

bench: deps venv peers
	$(ISOLATED) 'ip link set lo up && $(PY) benchmarks/bench_runtime.py && $(PY) benchmarks/bench_monitor.py && $(PY) benchmarks/bench_rollout.py && $(PY) benchmarks/bench_interfaces.py && $(PY) benchmarks/bench_isolation.py && $(PY) benchmarks/bench_images.py && $(PY) benchmarks/bench_peers.py && $(PY) benchmarks/bench_agent.py && $(PY) benchmarks/bench_novelty.py && $(PY) benchmarks/profile_step.py'

# the programs the red-team corpus's cases run (each case file's header lists what it relies on): a
# machine without them scores a case as missed because its tool was absent, not because corral was blind
REDTEAM_APT := socat tmux strace sqlite3 tcl jq xxd curl wget git vim less gdb nodejs

redteam: deps venv
	@missing=""; for p in $(REDTEAM_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(ISOLATED) 'ip link set lo up && $(VENV)/bin/corral bench redteam $(REDTEAM_ARGS)'

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) .corral build *.egg-info
