# lineinspect: `make demo` and `make test` each set up their own virtual environment from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
EXTRAS := train,ort,openvino,int8,basler,dev
DEMO   := demo_out

.PHONY: venv test lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to 2.13.0 in the 'train' extra (a CPU build on the build machines' disk).
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: venv
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  (apt-get update -q && apt-get install -y -q --no-install-recommends mosquitto); } || \
		{ echo "install the mosquitto MQTT broker first (e.g. sudo apt-get install mosquitto)"; exit 1; }
	$(VENV)/bin/lineinspect demo --out $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) runs
