#!/usr/bin/env bash
# Install what the tests need into .venv (created if missing) and run the whole suite.
# Exits non-zero on any failure, and also when pytest collects no test (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet safetensors  # optional extra: export_hf.py (tests/test_export_hf.py)
.venv/bin/python -m pip install --quiet matplotlib  # optional extra: plot_metrics.py (its tests draw a real PNG)
.venv/bin/python -m pip install --quiet huggingface_hub  # only for the test that parses the model card (tests/test_model_card.py)
.venv/bin/python -m pip install --quiet gguf  # optional extra: export_gguf.py (tests/test_export_gguf.py)
# llama.cpp itself, for the slow tests that run our GGUF files in it: pip builds it from source (about 5 minutes
# on 2 cores) the first time, then reuses the wheel from its cache; the version is the one docs/huggingface.md names
.venv/bin/python -m pip install --quiet llama-cpp-python==0.3.36 \
    || echo "note: llama-cpp-python did not build (it needs cmake and a C++ compiler): the llama.cpp tests skip"
.venv/bin/python -m pip install --quiet mpi4py mpich || echo "note: mpi4py + mpich did not install: the MPI tests skip"
# the explorer's browser test (tests/test_explore.py) drives headless Chromium; without it that test skips
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "note: chromium + chromium-driver did not install: the explorer's browser test skips"
fi
.venv/bin/python -m pip install --quiet selenium || echo "note: selenium did not install: the explorer's browser test skips"
.venv/bin/python -m pytest -q "$@"
