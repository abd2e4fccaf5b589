#!/usr/bin/env bash
# Issue 16: MEMIT and EMMET re-measured after the residual-stream fix, with every protocol in the result
# (mean per-token headline, summed column, zsRE specificity and locality, generation-based checks).
# The "before" numbers are the pre-fix files of benchmarks/tables.sh in benchmarks/results/tables/ (same
# records, same batch sizes; summed convention). Re-runnable like tables.sh: finished cells are skipped, an
# interrupted one resumes, v* are reused from the lmedit cache.
# Usage: benchmarks/fidelity.sh STAGE...   (stages: cf100 zsre100 rome ftc cfseq zsreseq zsre500 cf1000 cfseq1000
#        zsreseq500; default: all, in that order; the 500/1000 stages take hours on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/fidelity
source benchmarks/lib.sh  # DATA, CF, ZSRE and `run`; creates OUT

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
ftc() {  # FT-conditional with the paper's augmentation (the default: built-in fact pool), 100 edits trained together
  run cf100-ftc-default 100 counterfact --data $CF --limit 100 --method ft-conditional
  run zsre100-ftc-default 100 zsre --data $ZSRE --limit 100 --method ft-conditional
}
cfseq() {  # sequential batches of 10, each on top of the earlier ones (v* on the edited model: new defaults only)
  run cf100-memit-seq10 10 counterfact --data $CF --limit 100 --method memit --sequential
  run cf100-emmet-seq10 10 counterfact --data $CF --limit 100 --method emmet --sequential
}
zsreseq() {
  run zsre100-memit-seq10 10 zsre --data $ZSRE --limit 100 --method memit --sequential
  run zsre100-emmet-seq10 10 zsre --data $ZSRE --limit 100 --method emmet --sequential
}

zsre500() {  # all 500 zsRE records; MEMIT computes the v* every later cell reuses (same layer, same site)
  run zsre500-memit 100,500 zsre --data $ZSRE --method memit
  run zsre500-emmet 100,500 zsre --data $ZSRE --method emmet
  run zsre500-memit-lambda500.b500 500 zsre --data $ZSRE --method memit --set mom2_weight=500
  run zsre500-emmet-mu0.001-lambda5000.b500 500 zsre --data $ZSRE --method emmet --set mom2_weight=5000
}
cf1000() {  # CounterFact first 1000: one batch of 1000 and ten batches of 100
  run cf1000-memit 100,1000 counterfact --data $CF --limit 1000 --method memit
  run cf1000-emmet 100,1000 counterfact --data $CF --limit 1000 --method emmet
  run cf1000-memit-lambda500.b1000 1000 counterfact --data $CF --limit 1000 --method memit --set mom2_weight=500
  run cf1000-emmet-mu0.001-lambda5000.b1000 1000 counterfact --data $CF --limit 1000 --method emmet --set mom2_weight=5000
}
cfseq1000() {  # sequential: ten batches of 100, each on top of the earlier ones (fresh v* for batches 2-10)
  run cf1000-memit-seq100 100 counterfact --data $CF --limit 1000 --method memit --sequential
  run cf1000-emmet-seq100 100 counterfact --data $CF --limit 1000 --method emmet --sequential
}
zsreseq500() {
  run zsre500-memit-seq100 100 zsre --data $ZSRE --method memit --sequential
  run zsre500-emmet-seq100 100 zsre --data $ZSRE --method emmet --sequential
}

stages=("$@")
[[ ${#stages[@]} == 0 ]] && stages=(cf100 zsre100 cfseq rome ftc zsreseq zsre500 cf1000 cfseq1000 zsreseq500)
for s in "${stages[@]}"; do "$s"; done
