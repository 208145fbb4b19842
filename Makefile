# lineinspect: `make demo` and `make test` each set up their own virtual environment from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Re-install whenever pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
EXTRAS := train,ort,openvino,basler,dev
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
	$(VENV)/bin/lineinspect make-synthetic --out $(DEMO)/parts --size 256
	test -f $(DEMO)/bundle/model.json || $(VENV)/bin/lineinspect train --data $(DEMO)/parts --out $(DEMO)/bundle --epochs 8
	$(VENV)/bin/lineinspect evaluate --bundle $(DEMO)/bundle --data $(DEMO)/parts --out $(DEMO)/eval
	@echo "demo: export, calibration and the MQTT line service: not yet (see the open issues)"

clean:
	rm -rf $(VENV) $(DEMO) runs
