#!/usr/bin/env bash
# The SBN table on statically binarized MNIST: one layer of 200 binary units trained by
# wake-sleep, RWS (k = 5, 10) and the score-function ELBO at equal epochs, each scored by
# the evaluator (IWAE-K on a random subset of the test split). Reduced budget: EPOCHS
# epochs (Bornschein & Bengio 2015 trained to convergence), K importance samples on LIMIT
# test images. Usage: experiments/sbn_table.sh [RUNS_DIR] (default runs/sbn-table).
set -euo pipefail
RUNS=${1:-runs/sbn-table}
EPOCHS=${EPOCHS:-10}
K=${K:-1000}
LIMIT=${LIMIT:-1000}
OUT=experiments/results/sbn-mnist
mkdir -p "$OUT"
fit() {  # name, then the objective's options
  local name=$1; shift
  python -m pyro_vae fit sbn --dataset binarized-mnist --layers 200 --epochs "$EPOCHS" --eval-size 2000 \
    --figures none --seed 0 --run-dir "$RUNS/$name" --overwrite --quiet "$@"
  python -m pyro_vae evaluate "$RUNS/$name" --iw "$K" --limit "$LIMIT" --output "$RUNS/$name/eval.json" --device cpu
  mkdir -p "$OUT/$name"
  cp "$RUNS/$name/config.json" "$RUNS/$name/metrics.jsonl" "$RUNS/$name/eval.json" "$OUT/$name/"
}
fit wake-sleep --objective wake-sleep
fit rws5 --objective rws --particles 5
fit rws10 --objective rws --particles 10
fit score-function --objective tracegraph
