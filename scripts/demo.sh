#!/usr/bin/env bash
# The whole job end to end on the bundled sample, no network needed:
# prepare -> tokenize -> train a tiny model (about a minute) -> generate a story.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
echo "demo: not built yet (the model, training and generation land in later issues)"
