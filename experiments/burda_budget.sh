#!/usr/bin/env bash
# The IWAE paper's training budget (Burda et al. 2016: 3,280 passes, --lr-schedule burda)
# for the README's VAE and IWAE k=5 rows on statically binarized MNIST, batches of 100,
# then log p(x) with 5000 importance samples per test image; the run's config, metrics,
# curves and evaluation are copied to experiments/results/burda-ROW/.
# Each row takes hours on two cores. Stop it at any time (Ctrl-C, SIGTERM, or the machine
# going away between epochs): run the same command again and it continues where the
# checkpoint left off, with the same result as an uninterrupted run. Each piece's wall time
# is appended to RUNS/burda-ROW.pieces. To carry a row into the next session (a machine
# that does not outlive this one): python experiments/carry.py stop RUNS/burda-ROW, then
# python experiments/carry.py save RUNS/burda-ROW burda-ROW, and commit
# experiments/results/burda-ROW/carry/; this script restores it when RUNS/burda-ROW has no
# checkpoint, and removes it once the row is evaluated.
# Usage: bash experiments/burda_budget.sh ROW...   (ROW: vae or iwae5)
#   both at once on two cores, a thread each:
#   OMP_NUM_THREADS=1 bash experiments/burda_budget.sh vae & OMP_NUM_THREADS=1 bash experiments/burda_budget.sh iwae5
# (PYRO_VAE_DATA as usual; RUNS=folder of the run directories, default runs;
#  RESULTS=folder of the outputs, default experiments/results; EVAL_EVERY=N scores the
#  validation images every N epochs, default 10: scoring is about a sixth of an IWAE-5
#  epoch, and the weights trained are the same for every N)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 vae|iwae5 ..." >&2; exit 2; }
bin=$(dirname "$(command -v pyro-vae || echo .venv/bin/pyro-vae)")
runs=${RUNS:-runs} results=${RESULTS:-experiments/results} here=$(dirname "$0")
python=${PYTHON:-$bin/python}; [ -x "$python" ] || python=python3
timer=(); if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v); fi  # GNU time: wall and peak memory
epochs_done() { if [ -f "$1/metrics.jsonl" ]; then wc -l < "$1/metrics.jsonl"; else echo 0; fi; }
for row in "$@"; do
    case $row in
        vae) fit=(vae) ;;
        iwae5) fit=(iwae --particles 5) ;;
        *) echo "unknown row $row: use vae or iwae5" >&2; exit 2 ;;
    esac
    run=$runs/burda-$row out=$results/burda-$row
    if [ ! -f "$run/checkpoint.pt" ] && [ -f "$out/carry/MANIFEST.json" ]; then
        # a piece run in an earlier session, carried in the repository (experiments/carry.py)
        "$python" "$here/carry.py" --results "$results" restore "burda-$row" "$run"
    fi
    every=(--eval-every "${EVAL_EVERY:-10}")
    if [ -f "$run/checkpoint.pt" ]; then
        args=(fit "${fit[0]}" --run-dir "$run" --resume "${every[@]}")
    else
        args=(fit "${fit[@]}" --dataset binarized-mnist --lr-schedule burda --epochs 3280 "${every[@]}" --run-dir "$run")
    fi
    done_epochs=$(epochs_done "$run")
    if [ "$done_epochs" -lt 3280 ]; then
        start=$(date +%s) status=0
        "$bin/pyro-vae" "${args[@]}" || status=$?
        reached=$(epochs_done "$run")
        echo "epochs $((done_epochs + 1))-$reached in $(( $(date +%s) - start )) s, ended $(date -u +%FT%TZ)" \
             "with exit status $status, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >> "$run.pieces"
        [ "$status" -eq 0 ] || exit "$status"
    fi
    "${timer[@]}" "$bin/pyro-vae" evaluate "$run" --iw 5000 2> "$run.eval.time"
    grep -E "Elapsed|Maximum resident" "$run.eval.time" || true
    mkdir -p "$out"
    cp "$run/config.json" "$run/metrics.jsonl" "$run/figures/curves.png" "$run"/eval-test-iw5000.json "$run.pieces" "$out/"
    cp "$run.eval.time" "$out/evaluate.time"
    "$python" "$here/carry.py" --results "$results" drop "burda-$row"  # the finished run needs no carry
done
