#!/usr/bin/env bash
# The runs behind docs/results/traits.md, for one trait at a time: extract, calibrate, monitor-eval, report.
# usage: traits_figures.sh TRAIT MODEL JUDGE RUN_DIR [extra options for every stage, e.g. --device cuda]
# Small settings on purpose (see traits.md): 5 extraction questions × 5 prompt pairs × 1 sample, 64 tokens;
# calibration on 5 evaluation questions, 5 layers, the default strengths; monitoring on 8 graded prompts + 4 few-shot variants.
set -euo pipefail
trait=$1 model=$2 judge=$3 run=$4
shift 4
px=${PX:-personaxis}
$px trait extract "$trait" --model "$model" --judge "$judge" --run "$run" --questions 5 --pairs 5 --samples 1 \
    --max-tokens 64 --min-pairs 3 "$@"
$px trait calibrate "$trait" --model "$model" --judge "$judge" --vectors "$run/vectors.safetensors" --questions 5 \
    --max-tokens 64 "$@"
$px trait monitor-eval "$trait" --model "$model" --judge "$judge" --vectors "$run/vectors.safetensors" --questions 5 \
    --max-tokens 64 "$@"
$px trait report "$run"
