# lineinspect: `make demo` and `make test` each set up their own virtual environment from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
EXTRAS := train,ort,openvino,int8,basler,dev
DEMO   := demo_out

.PHONY: venv test lint demo clean broker browser

# The service tests and the demo talk to a real mosquitto broker (and make TLS certificates with
# openssl): installed from Debian's packages when missing and we may, else one clear line.
broker:
	@{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } && \
	  { command -v mosquitto_passwd >/dev/null 2>&1 || test -x /usr/bin/mosquitto_passwd; } && \
	  command -v openssl >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  (export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
		   apt-get install -y -q --no-install-recommends mosquitto openssl); } || \
		{ echo "install the mosquitto MQTT broker and openssl first (e.g. sudo apt-get install mosquitto openssl)"; exit 1; }

# The browser tests drive Debian's chromium with its chromedriver (Selenium is given the driver's
# path: nothing is downloaded). Installed when missing and we may; else the tests say what to install.
browser:
	@{ test -x /usr/bin/chromium || command -v chromium >/dev/null 2>&1; } && \
	  { test -x /usr/bin/chromedriver || command -v chromedriver >/dev/null 2>&1; } || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  (export DEBIAN_FRONTEND=noninteractive; apt-get update -q && \
		   apt-get install -y -q --no-install-recommends chromium chromium-driver); } || \
		echo "browser tests will be skipped: install chromium and chromium-driver (sudo apt-get install chromium chromium-driver)"

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

test: lint broker browser
	$(PY) -m pytest -q

demo: venv broker
	$(VENV)/bin/lineinspect demo --out $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) runs test-artifacts
