#!/usr/bin/env bash
# DRAW on statically binarized MNIST at a reduced budget (see the results README): without
# attention and with filterbank attention, then the evaluator on the test split; the run's
# config, metrics, figures and evaluation are copied to experiments/results/draw-ROW/.
# Stop it at any time (Ctrl-C, SIGTERM): the same command continues from the last epoch's
# checkpoint (pyro-vae fit --resume), with the same result as an uninterrupted run; each
# piece's wall time is appended to RUNS/draw-ROW.pieces.
# Usage: OMP_NUM_THREADS=1 bash experiments/draw_budget.sh ROW...   (ROW: none or filterbank)
# Settings (environment, defaults in brackets): STEPS [10], HIDDEN [128], ZDIM [10], READ [the
# filterbank read's N, 2], SUFFIX [appended to the row's folder names, none],
# EPOCHS [5], IW [K of the evaluation, 500], LIMIT [test images scored, 1000],
# RUNS [runs], RESULTS [experiments/results], PYRO_VAE_DATA as usual.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 none|filterbank ..." >&2; exit 2; }
bin=$(dirname "$(command -v pyro-vae || echo .venv/bin/pyro-vae)")
runs=${RUNS:-runs} results=${RESULTS:-experiments/results}
steps=${STEPS:-10} hidden=${HIDDEN:-128} read=${READ:-2} suffix=${SUFFIX:-} zdim=${ZDIM:-10} epochs=${EPOCHS:-5} iw=${IW:-500} limit=${LIMIT:-1000}
pyro_vae=("$bin/pyro-vae"); [ -x "$bin/pyro-vae" ] || pyro_vae=(python -m pyro_vae)
epochs_done() { if [ -f "$1/metrics.jsonl" ]; then wc -l < "$1/metrics.jsonl"; else echo 0; fi; }
for row in "$@"; do
    case $row in none|filterbank) ;; *) echo "unknown row $row: use none or filterbank" >&2; exit 2 ;; esac
    run=$runs/draw-$row$suffix out=$results/draw-$row$suffix
    if [ -f "$run/checkpoint.pt" ]; then
        args=(fit draw --run-dir "$run" --resume)
    else
        args=(fit draw --attention "$row" --steps "$steps" --hidden "$hidden" --z-dim "$zdim" --read-size "$read"
              --dataset binarized-mnist --epochs "$epochs" --eval-size 2000 --run-dir "$run")
    fi
    done_epochs=$(epochs_done "$run")
    if [ "$done_epochs" -lt "$epochs" ]; then
        start=$(date +%s) status=0
        "${pyro_vae[@]}" "${args[@]}" -q || status=$?
        reached=$(epochs_done "$run")
        echo "epochs $((done_epochs + 1))-$reached in $(( $(date +%s) - start )) s, ended $(date -u +%FT%TZ)" \
             "with exit status $status, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >> "$run.pieces"
        [ "$status" -eq 0 ] || exit "$status"
    fi
    start=$(date +%s)
    "${pyro_vae[@]}" evaluate "$run" --iw "$iw" --limit "$limit"
    echo "evaluate --iw $iw --limit $limit in $(( $(date +%s) - start )) s" >> "$run.pieces"
    mkdir -p "$out"
    cp "$run/config.json" "$run/metrics.jsonl" "$run/eval-test-iw$iw-n$limit.json" "$run.pieces" "$out/"
    cp "$run"/figures/*.png "$out/"
done
