#!/usr/bin/env bash
# The canonical-examples table at CPU scale: every task and method with the default hyperparameters (no search),
# 3 epochs, reported on val:b, each evaluation file cut to its first 60 records, 20 general-text documents of 128
# tokens. The full protocol (Optuna on val:a, report on val:b, all records) is the same command with
# --trials N and without --eval-limit; see README.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/canonical/quick-val-b.json
[[ -f $out ]] && { echo "$out exists"; exit 0; }
/usr/bin/time -f "canonical quick table: %e s wall, %M KB peak" \
  .venv/bin/lmedit eval canonical --all --data-dir ../shared/data/canonical --split val:b --trials 0 --epochs 3 \
  --n-docs 20 --max-tokens 128 --eval-limit 60 --out "$out"
