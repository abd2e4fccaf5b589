#!/usr/bin/env bash
# Issue 20: lifelong editing. AlphaEdit and UltraEdit beside MEMIT and EMMET (benchmarks/fidelity.sh's cfseq and
# zsreseq500 stages give those rows), batches made one after another, and UltraEdit's 10,000-edit sequence with
# its forgetting curve. Re-runnable like fidelity.sh: finished cells are skipped, an interrupted one resumes (with
# the carried state kept beside its journal).
# Usage: benchmarks/lifelong.sh STAGE...   (stages: cfseq zsreseq500 cfseq1000 cf10k; default: all, in that order)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/lifelong
source benchmarks/lib.sh  # DATA, CF, ZSRE and `run`; creates OUT

cfseq() {  # the first 100 CounterFact edits in ten sequential batches of 10 (MEMIT/EMMET: fidelity.sh cfseq)
  run cf100-alphaedit-seq10 10 counterfact --data $CF --limit 100 --method alphaedit --sequential --curve-at 30,60
  run cf100-ultraedit-seq10 10 counterfact --data $CF --limit 100 --method ultraedit --sequential --curve-at 30,60
}
zsreseq500() {  # all 500 zsRE records in five sequential batches of 100, locality both ways
  run zsre500-ultraedit-seq100 100 zsre --data $ZSRE --method ultraedit --sequential --curve-at 100,200,300,400
  run zsre500-alphaedit-seq100 100 zsre --data $ZSRE --method alphaedit --sequential --curve-at 100,200,300,400
}
cfseq1000() {  # the first 1000 CounterFact edits in ten sequential batches of 100 (MEMIT/EMMET: fidelity.sh cfseq1000)
  run cf1000-ultraedit-seq100 100 counterfact --data $CF --limit 1000 --method ultraedit --sequential \
    --curve-at 100,300,600
  run cf1000-alphaedit-seq100 100 counterfact --data $CF --limit 1000 --method alphaedit --sequential \
    --curve-at 100,300,600
}
cf10k() {  # every CounterFact edit record, 100 sequential batches of 100, UltraEdit; the curve on a seeded sample
  run cf10000-ultraedit-seq100 100 counterfact --data $CF --method ultraedit --sequential --no-generated \
    --curve-at 100,1000,2000,5000 --curve-sample 1000
}

for stage in "${@:-cfseq zsreseq500 cfseq1000 cf10k}"; do
  for s in $stage; do "$s"; done
done
