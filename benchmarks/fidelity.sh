#!/usr/bin/env bash
# Issue 16: MEMIT and EMMET re-measured after the residual-stream fix, with every protocol in the result
# (mean per-token headline, summed column, zsRE specificity and locality, generation-based checks).
# The "before" numbers are the pre-fix files of benchmarks/tables.sh in benchmarks/results/tables/ (same
# records, same batch sizes; summed convention). Re-runnable like tables.sh: finished cells are skipped, an
# interrupted one resumes, v* are reused from the lmedit cache.
# Usage: benchmarks/fidelity.sh STAGE...   (stages: cf100 zsre100 rome cfseq zsreseq; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
LM=.venv/bin/lmedit
DATA=../shared/data
OUT=benchmarks/results/fidelity
CF=$DATA/counterfact/counterfact-edit.json
ZSRE=$DATA/zsre/zsre-500.json
mkdir -p "$OUT"

run() {  # run OUTPUT_STEM BATCH TASK ARGS...
  local stem=$1 size=$2 task=$3; shift 3
  if [[ -f $OUT/$stem.json ]]; then echo "== $stem: done"; return; fi
  echo "== $stem ($(date +%T))"
  /usr/bin/time -f "== $stem: %e s wall, %M KB peak" \
    $LM eval "$task" --batch-size "$size" --out "$OUT/$stem.json" --resume "$@"
}

cf100() {  # MEMIT and EMMET share v* (same last layer, same site): each further cell costs only its solve
  run cf100-memit.b100 100 counterfact --data $CF --limit 100 --method memit
  run cf100-emmet.b100 100 counterfact --data $CF --limit 100 --method emmet
  # the pre-fix defaults, for the before → after table (same settings, only the fix differs)
  run cf100-memit-lambda500.b100 100 counterfact --data $CF --limit 100 --method memit --set mom2_weight=500
  run cf100-emmet-mu0.001-lambda5000.b100 100 counterfact --data $CF --limit 100 --method emmet --set mom2_weight=5000
}
zsre100() {
  run zsre100-memit.b100 100 zsre --data $ZSRE --limit 100 --method memit
  run zsre100-emmet.b100 100 zsre --data $ZSRE --limit 100 --method emmet
  run zsre100-memit-lambda500.b100 100 zsre --data $ZSRE --limit 100 --method memit --set mom2_weight=500
  run zsre100-emmet-mu0.001-lambda5000.b100 100 zsre --data $ZSRE --limit 100 --method emmet --set mom2_weight=5000
}
rome() {  # generation-based checks beside teacher-forced ones for ROME (each edit alone)
  run cf100-rome.b1 1 counterfact --data $CF --limit 100 --method rome
  run zsre100-rome.b1 1 zsre --data $ZSRE --limit 100 --method rome
}
cfseq() {  # sequential batches of 10, each on top of the earlier ones (v* on the edited model: new defaults only)
  run cf100-memit-seq10 10 counterfact --data $CF --limit 100 --method memit --sequential
  run cf100-emmet-seq10 10 counterfact --data $CF --limit 100 --method emmet --sequential
}
zsreseq() {
  run zsre100-memit-seq10 10 zsre --data $ZSRE --limit 100 --method memit --sequential
  run zsre100-emmet-seq10 10 zsre --data $ZSRE --limit 100 --method emmet --sequential
}

stages=("$@")
[[ ${#stages[@]} == 0 ]] && stages=(cf100 zsre100 cfseq rome zsreseq)
for s in "${stages[@]}"; do "$s"; done
