#!/usr/bin/env bash
# README's main command: install, then run the end-to-end demo on the embedded default bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
taskcodec demo "$@"
