#!/usr/bin/env bash
# One cell group of the canonical-examples table with the search, at CPU scale: Optuna picks the hyperparameters on
# val:a (first half of every file), the choice is reported on val:b; 8 trials of at most 5 epochs, the evaluation
# files cut to 60 records, 20 general-text documents of 128 tokens. Resumable (the study and run cache persist).
# Usage: benchmarks/canonical_search.sh TASK METHOD [TRIALS]; FORCE=1 replaces a finished file (e.g. with more
# trials: the study resumes where it stopped and only the new trials run).
set -euo pipefail
cd "$(dirname "$0")/.."
task=$1 method=$2 trials=${3:-8}
out=benchmarks/results/canonical/search-$task-$method.json
[[ -f $out && -z ${FORCE:-} ]] && { echo "$out exists (FORCE=1 to replace it)"; exit 0; }
/usr/bin/time -f "== search $task $method: %e s wall, %M KB peak" \
  .venv/bin/lmedit eval canonical --task "$task" --method "$method" --data-dir ../shared/data/canonical --split val \
  --trials "$trials" --epochs 5 --n-docs 20 --max-tokens 128 --eval-limit 60 --league 1e-3,1e-4,1e-5 --out "$out" ${FORCE:+--force}
