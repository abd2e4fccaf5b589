#!/usr/bin/env bash
# Backpack end to end on a CPU (DESIGN §6): train a small Backpack with SmolLM2's tokenizer, then sense fine-tuning
# on country_capital (the Backpack alone, and steering SmolLM2 through the ensemble). The quick protocol of
# canonical_quick.sh: val:b, 60 records per evaluation file, 20 general-text documents of 128 tokens.
# Usage: benchmarks/backpack_demo.sh [STEPS]   (the model goes to out/backpack-smol, results to results/backpack/)
set -euo pipefail
cd "$(dirname "$0")/.."
LM=.venv/bin/lmedit
STEPS=${1:-600}
MODEL=out/backpack-smol
OUT=benchmarks/results/backpack
mkdir -p "$OUT"
if [[ -f $MODEL/train_state.json ]]; then resume=--resume; else resume=--force; fi
/usr/bin/time -f "== train: %e s wall, %M KB peak" \
  $LM backpack train --out $MODEL --steps "$STEPS" --batch-size 8 --checkpoint-every 100 $resume
cp $MODEL/train_state.json "$OUT/train_state.json"
quick=(--task country_capital --data-dir ../shared/data/canonical --split val:b --method senses --epochs 3
       --n-docs 20 --max-tokens 128 --eval-limit 60 --league 1e-3,1e-4,1e-5 --force)
/usr/bin/time -f "== senses, Backpack alone: %e s wall, %M KB peak" \
  $LM eval canonical "${quick[@]}" --model $MODEL --set lr=1e-2 --out "$OUT/senses-backpack-country_capital.json"
/usr/bin/time -f "== senses, ensemble with SmolLM2: %e s wall, %M KB peak" \
  $LM eval canonical "${quick[@]}" --model $MODEL --ensemble-with smollm2-135m --set lr=1e-2 \
  --out "$OUT/senses-ensemble-country_capital.json"
