#!/usr/bin/env bash
# The canonical-examples table at CPU scale, one cell group at a time (canonical_search.sh: Optuna on val:a, report
# on val:b, cut-down evaluation), then merged into one markdown page and PNG with `lmedit report`. Finished cells
# are kept, so an interrupted run continues. The cell groups are independent: on several cores (or machines sharing
# an Optuna --storage) run canonical_search.sh for different groups at once, then the last line.
# Usage: benchmarks/canonical_table.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-4}
for task in country_capital company_ceo temporal stereoset pronoun_gender_bias verb_conjugation; do
  methods="ft ft-conditional lora ft+kl lora+kl"  # +kl: the regularised baselines (KL to the unedited model)
  [[ $task == country_capital || $task == company_ceo ]] && methods="$methods memit"  # a subject to locate
  for method in $methods; do
    benchmarks/canonical_search.sh "$task" "$method" "$trials"
  done
done
.venv/bin/lmedit report benchmarks/results/canonical/search-*.json --out benchmarks/results/canonical/table --force
