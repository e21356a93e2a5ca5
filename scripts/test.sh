#!/usr/bin/env bash
# README's test command: install, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q -rs "$@"
