# vmrepo: `make demo` runs the built-in example, `make test` runs the test suite.
# Both install what they need: Debian packages via apt-get (only those missing)
# and a virtualenv in .venv with the project and its Python dependencies.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# command:package pairs checked before each target
SYSTEM_DEPS := qemu-img:qemu-utils qemu-io:qemu-utils qemu-system-x86_64:qemu-system-x86 \
	nbdinfo:libnbd-bin
# what only the tests need: a fake clock for the docs sandbox, loop devices
TEST_DEPS := faketime:faketime losetup:mount libvirtd:libvirt-daemon \
	:libvirt-daemon-driver-qemu virsh:libvirt-clients :libvirt-dev pkg-config:pkg-config gcc:gcc
BENCH_DEPS := borg:borgbackup restic:restic

.PHONY: demo test bench lint system-deps bench-deps test-deps clean

demo: system-deps $(VENV)/.installed
	$(PY) -m vmrepo.demo

test: system-deps test-deps $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: test-deps $(VENV)/.installed-test
	$(VENV)/bin/ruff check repo sources storage tests bench
	MYPY=$(abspath $(VENV))/bin/mypy ./.ci/typecheck

bench: system-deps bench-deps test-deps $(VENV)/.installed-test
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/scale_bench.py
	$(PY) bench/index_bench.py
	$(PY) bench/nbd_read_bench.py
	$(PY) bench/serve_bench.py

system-deps:
	@./.ci/apt-ensure $(SYSTEM_DEPS)
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || ./.ci/apt-ensure :python3-venv

bench-deps:
	@./.ci/apt-ensure $(BENCH_DEPS)

test-deps:
	@./.ci/apt-ensure $(TEST_DEPS)

# the program alone (demo), and with the test tools (test, lint, bench: libvirt-python
# builds against libvirt-dev, which test-deps installs)
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e .
	@$(PY) -m compileall -q repo sources storage  # as a regular install does: faster start-up
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
