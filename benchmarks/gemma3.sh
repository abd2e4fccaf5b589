#!/usr/bin/env bash
# Issue 22: the CounterFact tables on the second embedded model, gemma3-270m (`make install-extra` first), beside
# SmolLM2's in docs/results.md. Same protocol and records as fidelity.sh's cf100/cf1000 stages (mean per-token
# headline, the summed column, generation-based checks). Re-runnable: finished cells are skipped, an interrupted one
# resumes, v* are reused from the lmedit cache (MEMIT and EMMET share them: same last layer, same site).
# Usage: benchmarks/gemma3.sh STAGE...   (stages: cf100 rome ftc cf1000; default: cf100 rome ftc)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gemma3
source benchmarks/lib.sh  # DATA, CF, ZSRE and `run`; creates OUT
G=(--model gemma3-270m)

cf100() {  # MEMIT (layers 1-4, λ 2000: benchmarks/results/gemma3-defaults) and EMMET on the same v*
  run cf100-memit.b100 100 counterfact --data $CF --limit 100 --method memit "${G[@]}"
  run cf100-emmet.b100 100 counterfact --data $CF --limit 100 --method emmet "${G[@]}"
}
rome() {  # each edit alone, layer 3
  run cf100-rome.b1 1 counterfact --data $CF --limit 100 --method rome "${G[@]}"
}
ftc() {  # FT-conditional with the paper's augmentation, 100 edits trained together
  run cf100-ftc-default 100 counterfact --data $CF --limit 100 --method ft-conditional "${G[@]}"
}
cf1000() {
  run cf1000-memit 100,1000 counterfact --data $CF --limit 1000 --method memit "${G[@]}"
  run cf1000-emmet 100,1000 counterfact --data $CF --limit 1000 --method emmet "${G[@]}"
}

stages=("$@")
[[ ${#stages[@]} == 0 ]] && stages=(cf100 rome ftc)
for s in "${stages[@]}"; do "$s"; done
