#!/usr/bin/env bash
# One command checks the edge install and the codec's bytes on Linux aarch64 (issue 10 item 5):
#
#   bash scripts/check-aarch64.sh            (root, Debian/Ubuntu host; about 2 min warm, see bench/results/aarch64.md)
#
# 1. a Debian bookworm arm64 root under qemu-user-static (mmdebstrap from the mirror apt already uses), cached in
#    $TASKCODEC_AARCH64_CACHE (default ~/.cache/taskcodec-aarch64) with a venv and aarch64 wheels of the base
#    dependencies (downloaded on this host with `pip download --platform`, so pip in the root needs no network);
# 2. the base (edge) package installed in that root from this working tree (pip, no extras, no torch; its optional
#    C coder compiled there by the root's own gcc);
# 3. there: `taskcodec verify-bundle` (the default bundle's golden vectors) with each entropy coder backend, the fp32
#    and int8 encoders' symbols on real frames, the preprocessing of virtual-camera frames, and 1000 Fashion-MNIST
#    frames encoded on x86 decoded on aarch64, re-encoded there and decoded back on x86 — all compared bit-exactly
#    (scripts/check_aarch64.py does the work on both sides);
# 4. writes bench/results/aarch64.{json,md}. Exit status 0 only if everything is bit-exact.
#
# Environment: TASKCODEC_AARCH64_CACHE (cache folder), TASKCODEC_AARCH64_CPU (qemu CPU model, default max; e.g.
# cortex-a72 for a Raspberry Pi 4), TASKCODEC_AARCH64_OUT (results folder, default bench/results),
# TASKCODEC_AARCH64_MIRROR (Debian mirror; default: the first deb.debian.org-style URI apt uses).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
CACHE=${TASKCODEC_AARCH64_CACHE:-$HOME/.cache/taskcodec-aarch64}
ROOT=$CACHE/bookworm-arm64
OUT=${TASKCODEC_AARCH64_OUT:-$REPO/bench/results}
export QEMU_CPU=${TASKCODEC_AARCH64_CPU:-max}
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
log() { echo "[check-aarch64 +$(( $(date +%s) - START ))s] $*" >&2; }
mkdir -p "$CACHE" "$OUT"
TIMES=$CACHE/times.env; : > "$TIMES"
mark() { echo "$1=$(( $(date +%s) - $2 ))" >> "$TIMES"; }

# --- 1. qemu-user-static + binfmt (the F flag lets the kernel run arm64 binaries inside the chroot) -------------
t=$(date +%s)
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  $SUDO update-binfmts --enable qemu-aarch64 || $SUDO update-binfmts --import qemu-aarch64
fi
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "binfmt qemu-aarch64 lacks the F flag" >&2; exit 2; }
mark setup_s "$t"

# --- 2. the arm64 root (cached) ------------------------------------------------------------------------------
t=$(date +%s)
MIRROR=${TASKCODEC_AARCH64_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
  /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^ ]+' | head -1 || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT_PACKAGES="python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates"
if [ ! -f "$ROOT/.taskcodec-root" ] || [ "$(cat "$ROOT/.taskcodec-root")" != "$ROOT_PACKAGES" ]; then
  log "building the bookworm arm64 root from $MIRROR (once; a few minutes under qemu)"
  rm -rf "$ROOT.tmp" "$ROOT"
  mmdebstrap --quiet --arch=arm64 --variant=minbase --include="$ROOT_PACKAGES" bookworm "$ROOT.tmp" "$MIRROR"
  echo "$ROOT_PACKAGES" > "$ROOT.tmp/.taskcodec-root"
  mv "$ROOT.tmp" "$ROOT"
fi
mark root_s "$t"

cleanup() {
  for m in "$ROOT/proc" "$ROOT/dev" "$ROOT/opt/wheels"; do
    mountpoint -q "$m" 2>/dev/null && $SUDO umount -l "$m" || true
  done
}
trap cleanup EXIT
mkdir -p "$ROOT/opt/wheels" "$ROOT/opt/work"
mountpoint -q "$ROOT/proc" || $SUDO mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || $SUDO mount --bind /dev "$ROOT/dev"
CHROOT=$(command -v chroot || echo /usr/sbin/chroot)
in_root() { $SUDO env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" \
  TASKCODEC_CODER="${TASKCODEC_CODER:-}" OMP_NUM_THREADS=1 "$CHROOT" "$ROOT" "$@"; }
[ "$(in_root uname -m)" = aarch64 ] || { echo "the root does not run as aarch64" >&2; exit 2; }

# --- 3. aarch64 wheels of the base dependencies (downloaded here; cached by the dependency list) ----------------
t=$(date +%s)
DEPS=$($PY - <<'EOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
EOF
)
BUILD_DEPS=$($PY - <<'EOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"] + ["wheel"]))
EOF
)
KEY=$(printf '%s\n%s\n' "$DEPS" "$BUILD_DEPS" | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$KEY
if [ ! -f "$WHEELS/.complete" ]; then
  log "downloading aarch64 wheels for: $(echo $DEPS)"
  rm -rf "$WHEELS"; mkdir -p "$WHEELS"
  printf '%s\n%s\n' "$DEPS" "$BUILD_DEPS" > "$WHEELS/requirements.txt"
  # pip does not widen a given platform to older manylinux tags: list every glibc up to bookworm's 2.36
  PLATFORMS=(--platform manylinux2014_aarch64 --platform linux_aarch64)
  for v in 17 24 25 26 27 28 29 30 31 32 33 34 35 36; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
  if ! PIP_CONSTRAINT="" $PY -m pip download -q --dest "$WHEELS" --only-binary=:all: --implementation cp \
      --python-version 3.11 "${PLATFORMS[@]}" -r "$WHEELS/requirements.txt"; then
    echo "error: no aarch64 wheels for the base dependencies ($(echo $DEPS)); a dependency without an aarch64" \
         "wheel (constriction publishes none) must leave the base install first" >&2
    exit 3
  fi
  touch "$WHEELS/.complete"
  find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$KEY" -exec rm -rf {} +  # older dependency lists
fi
mountpoint -q "$ROOT/opt/wheels" || $SUDO mount --bind "$WHEELS" "$ROOT/opt/wheels"
mark wheels_s "$t"

# --- 4. the base package from this working tree, installed in the root's venv --------------------------------
t=$(date +%s)
if [ ! -x "$ROOT/opt/venv/bin/python" ] || [ "$(cat "$ROOT/opt/venv/.wheels" 2>/dev/null)" != "$KEY" ]; then
  if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
    log "creating the root's venv"
    in_root python3 -m venv /opt/venv
  fi
  log "installing the aarch64 wheels into the root's venv (only what changed)"
  in_root /opt/venv/bin/pip install -q --no-index --find-links /opt/wheels -r /opt/wheels/requirements.txt
  echo "$KEY" > "$ROOT/opt/venv/.wheels"
fi
log "installing taskcodec from the working tree into the root"
rm -rf "$ROOT/opt/src"; mkdir -p "$ROOT/opt/src"
git ls-files -z --cached --others --exclude-standard | grep -zv '^bench/results/' \
  | xargs -0 -I{} sh -c 'test -f "{}" && printf "%s\0" "{}"' | tar --null -T - -cf - | tar -x -C "$ROOT/opt/src"
# setuptools and wheel are in the venv (the build requirements are among the cached wheels): no isolated build env
in_root /opt/venv/bin/pip install -q --no-index --find-links /opt/wheels --no-deps --force-reinstall \
  --no-build-isolation /opt/src
in_root /opt/venv/bin/pip check >/dev/null
mark install_s "$t"

# --- 5. the checks -------------------------------------------------------------------------------------------
t=$(date +%s)
WORK=$ROOT/opt/work
rm -rf "${WORK:?}"/*
log "x86: encoding the reference frames"
$PY scripts/check_aarch64.py x86-prepare "$WORK"
cp scripts/check_aarch64.py "$WORK/check_aarch64.py"
for backend in c python; do
  log "aarch64: taskcodec verify-bundle (coder $backend)"
  set +e
  TASKCODEC_CODER=$backend in_root /opt/venv/bin/taskcodec verify-bundle > "$WORK/verify-$backend.txt" 2>&1
  echo $? > "$WORK/verify-$backend.rc"
  set -e
done
log "aarch64: encoders, preprocessing and the coder on the reference frames"
in_root /opt/venv/bin/python /opt/work/check_aarch64.py arm-run /opt/work
mark checks_s "$t"
echo "total_s=$(( $(date +%s) - START ))" >> "$TIMES"
log "x86: comparing"
$PY scripts/check_aarch64.py x86-compare "$WORK" "$OUT" --times "$TIMES" --qemu-cpu "$QEMU_CPU" \
  --qemu "$(qemu-aarch64-static --version | head -1)"
