#!/usr/bin/env bash
# Short-run ablations of the SSVAE (M2) recipe at 100 labels: each arm is the defaults
# with one change, trained for EPOCHS epochs on the label draw SEED, one run at a time.
# Runs already finished (EPOCHS rows of metrics) are skipped; an unfinished one is resumed.
# Usage: bash experiments/ssvae_ablations.sh ARM...      (ARM: a name from the table below)
#   EPOCHS (default 6), SEED (default 0), RUNS (default runs) from the environment.
# The retrain arm needs RUNS/draw-SEED.txt, the labelled rows of draw SEED (one per line).
# Then: python experiments/ssvae_ablations.py RUNS/abl-* --out experiments/results/ssvae-ablations
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 ARM..." >&2; exit 2; }
epochs=${EPOCHS:-6} seed=${SEED:-0} runs=${RUNS:-runs}
pyro_vae=(${PYRO_VAE:-pyro-vae})
for arm in "$@"; do
    case $arm in
        default) flags=() ;;
        # the defaults again on the same labelled images (RUNS/draw-SEED.txt) with other
        # weights, batches and binarizations: how far two runs of one recipe differ
        retrain) flags=(--labels 100 --labelled-rows "$runs/draw-$seed.txt" --seed $((seed + 5))) ;;
        aux0.1) flags=(--aux-weight 0.1) ;;        # Kingma et al.'s alpha = 0.1 N in this loop's units
        aux10) flags=(--aux-weight 10) ;;
        aux1000) flags=(--aux-weight 1000) ;;
        aux300) flags=(--aux-weight 300) ;;
        aux30) flags=(--aux-weight 30) ;;
        grey-cb) flags=(--likelihood continuous-bernoulli --binarize none) ;;
        lr3e-4) flags=(--lr 3e-4) ;;
        lr3e-3) flags=(--lr 3e-3) ;;
        particles4) flags=(--particles 4) ;;
        wide1x500) flags=(--hidden 500 --classifier-hidden 500) ;;  # Pyro's example: one layer of 500
        wide500x2) flags=(--hidden 500,500 --classifier-hidden 500,500) ;;
        softplus) flags=(--activation softplus) ;;
        relu) flags=(--activation relu) ;;
        z50) flags=(--z-dim 50) ;;
        z16) flags=(--z-dim 16) ;;
        beta1-0.95) flags=(--adam-beta1 0.95) ;;  # Pyro's SS-VAE example
        *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac
    run=$runs/abl-$arm-s$seed
    done_epochs=0; [ -f "$run/metrics.jsonl" ] && done_epochs=$(wc -l < "$run/metrics.jsonl")
    if [ "$done_epochs" -ge "$epochs" ]; then echo "$arm: done"; continue; fi
    if [ -f "$run/checkpoint.pt" ]; then
        args=(fit ssvae --run-dir "$run" --resume --epochs "$epochs")
    else
        args=(fit ssvae --labels 100 --seed "$seed" --epochs "$epochs" --figures none "${flags[@]}" --run-dir "$run" --overwrite)
    fi
    echo "== $arm: pyro-vae ${args[*]}"
    start=$(date +%s)
    "${pyro_vae[@]}" "${args[@]}"
    echo "$arm $(( $(date +%s) - start )) s" >> "$runs/abl-wall.txt"
done
