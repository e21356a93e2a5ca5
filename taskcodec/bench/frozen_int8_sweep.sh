#!/usr/bin/env bash
# The int8 schemes of bench/results/transfer_int8_sweep.json, in its order, each measured against the fp32 encoder of
# the bundle (all 10000 Fashion-MNIST test frames, ORT 1 thread, fp32/int8 latency interleaved). Every flag is spelled
# out so the lines do not depend on the defaults. Usage:
#   bench/frozen_int8_sweep.sh [BUNDLE] [LOG]      (defaults: runs/bundles/frozen160, the sweep JSON; appends)
set -euo pipefail
BUNDLE=${1:-runs/bundles/frozen160}
LOG=${2:-bench/results/transfer_int8_sweep.json}
try() { local note=$1; shift; taskcodec frozen int8 "$BUNDLE" --eval-frames 10000 --log "$LOG" --note "$note" "$@"; }
PCT=(--method percentile --percentile 99.99 --percentile-linear 99.9 --calib 512)
try "percentile 99.99 (ReLU6) / 99.9 (linear, residual), first conv fp32, all else int8" \
    "${PCT[@]}" --fp32-first-convs 1 --no-latent-correction
try "same + per-latent gain/offset correction" "${PCT[@]}" --fp32-first-convs 1 --latent-correction
try "minmax" --method minmax --fp32-first-convs 1 --no-latent-correction
try "percentile 99.99 everywhere" "${PCT[@]}" --percentile-linear 99.99 --fp32-first-convs 1 --no-latent-correction
try "per-tensor MSE-optimal ranges" --method mse --fp32-first-convs 1 --no-latent-correction
try "first conv int8 too (the input normalisation then runs NHWC)" "${PCT[@]}" --fp32-first-convs 0 \
    --no-latent-correction
try "ReLU6 left fp32 (a DQ -> Clip -> Q round trip after every conv)" "${PCT[@]}" --fp32-clip --fp32-first-convs 1 \
    --no-latent-correction
try "previous scheme: last conv + depthwise convs excluded, Clip fp32, first conv int8, percentile 99.99" \
    "${PCT[@]}" --fp32-first-convs 0 --fp32-clip --keep-fp32-convs 1 --fp32-depthwise --percentile-linear 99.99 \
    --no-latent-correction
try "CHOSEN (the default): block 1 (first 3 convs) fp32 as one prefix + per-latent correction" "${PCT[@]}" \
    --fp32-first-convs 3 --latent-correction
try "block 1 (first 3 convs) fp32 as one prefix" "${PCT[@]}" --fp32-first-convs 3 --no-latent-correction
try "blocks 1-2 (first 6 convs) fp32 + per-latent correction" "${PCT[@]}" --fp32-first-convs 6 --latent-correction
try "chosen scheme in QOperator format" "${PCT[@]}" --fp32-first-convs 3 --latent-correction --format qoperator
try "chosen scheme with s8 symmetric activations (S8S8)" "${PCT[@]}" --fp32-first-convs 3 --latent-correction \
    --activations s8
