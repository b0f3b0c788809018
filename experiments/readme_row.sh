#!/usr/bin/env bash
# Reproduces one row of the README's results table: `pyro-vae fit MODEL [OPTIONS]`, then
# log p(x) with 5000 importance samples per image on the full test set, and for models
# with mixture components the clustering of the test set. Wall times and peak memory come
# from GNU time.
# Usage: bash experiments/readme_row.sh RUN_DIR MODEL [FIT OPTIONS...]
#   e.g. bash experiments/readme_row.sh runs/readme-vae vae
#        bash experiments/readme_row.sh runs/readme-gmvae gmvae --components 10
# (PYRO_VAE_DATA or --data-dir as usual)
set -euo pipefail
run=$1 model=$2
shift 2
bin=$(dirname "$(command -v pyro-vae || echo .venv/bin/pyro-vae)")
/usr/bin/time -v "$bin/pyro-vae" fit "$model" --run-dir "$run" "$@" 2> "$run.fit.time"
/usr/bin/time -v "$bin/pyro-vae" evaluate "$run" --iw 5000 2> "$run.eval.time"
if [ "$model" = gmvae ]; then
    "$bin/pyro-vae" cluster "$run"
fi
grep -E "Elapsed|Maximum resident" "$run.fit.time" "$run.eval.time"
