# mlamoe: `make compile TARGET=ascend|ort-cpu|ort-cuda [MODEL=trained-small|small|<checkpoint dir>] [OUT=dist/...] [QUANT=int8]`
#         `make test` (the fast suite CI runs), `make test-slow`, `make bench`.
# Each target sets up .venv with the pinned dependencies (constraints.txt) by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TARGET ?= ascend
MODEL  ?= trained-small
QUANT  ?=
SOC    ?= Ascend910B3
OUT    ?= dist/$(notdir $(MODEL))-$(TARGET)
EXTRA  ?=

.PHONY: venv genai-venv test test-slow compile bench clean
venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# onnxruntime-genai in its own environment (it must not share one with onnxruntime-gpu); tests/test_genai.py
# finds it at .venv-genai/ (or $$MLAMOE_GENAI_PYTHON) and skips, saying so, where it is absent
genai-venv:
	test -x .venv-genai/bin/python || $(PYTHON) -m venv .venv-genai
	.venv-genai/bin/python -m pip install -q --disable-pip-version-check onnxruntime-genai==0.18.0

# two workers (pytest-xdist), a whole test file per worker (module fixtures built once): both CI cores busy
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

compile: $(STAMP)
	$(BIN)/mlamoe compile --model $(MODEL) --target $(TARGET) --out $(OUT) --force \
		$(if $(QUANT),--quant $(QUANT)) $(if $(filter ascend,$(TARGET)),--soc $(SOC)) $(EXTRA)

bench: $(STAMP)
	$(BIN)/mlamoe bench --model $(MODEL) --target ort-cpu

clean:
	rm -rf dist .pytest_cache
