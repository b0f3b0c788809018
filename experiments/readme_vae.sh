#!/usr/bin/env bash
# Reproduces the VAE row of the README's results table: the default `pyro-vae fit vae` on
# MNIST (dynamic binarization), then log p(x) with 5000 importance samples per image on
# the full test set. Wall times and peak memory come from GNU time.
# Usage: bash experiments/readme_vae.sh [RUN_DIR]   (PYRO_VAE_DATA or --data-dir as usual)
set -euo pipefail
run=${1:-runs/readme-vae}
bin=$(dirname "$(command -v pyro-vae || echo .venv/bin/pyro-vae)")
/usr/bin/time -v "$bin/pyro-vae" fit vae --run-dir "$run" 2> "$run.fit.time"
/usr/bin/time -v "$bin/pyro-vae" evaluate "$run" --iw 5000 2> "$run.eval.time"
grep -E "Elapsed|Maximum resident" "$run.fit.time" "$run.eval.time"
