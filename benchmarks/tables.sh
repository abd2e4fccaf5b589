#!/usr/bin/env bash
# The measured evaluation tables of the README (issues 4 and 5), one lmedit command per cell group.
# Re-runnable: a group whose result files exist is skipped; an interrupted group resumes from its journal,
# and v* already optimised for the same request on the same model is reused from the lmedit cache.
# Usage: benchmarks/tables.sh STAGE...   (stages: cf100 ft100 ft100single seq100 zsre100 seqzsre100 ftzsre100 cf1000
#        cf1000small zsre500 ftzsre500 ft1000 ft1000base seq1000 seqzsre500 zsrelambda;
#        default: all, in that order)
# Each command runs alone: two torch processes on a 2-core machine slow each other many times over.
# MEMIT and EMMET: the cells below were measured before issue 16's residual-stream fix; their results are in
# results/tables-prefix/ (the "before" of README's before → after table). The 100-record cells are re-measured by
# benchmarks/fidelity.sh; re-running a 1000/500 stage here measures the post-fix code at the current defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/tables
source benchmarks/lib.sh  # DATA, CF, ZSRE and `run`; creates OUT

cf100() {  # EMMET with the defaults is MEMIT (λ = μλ′, see README); μ = 0.001 is the near-equality regime
  run cf100-memit 1,10,100 counterfact --data $CF --limit 100 --method memit
  run cf100-emmet 1,10,100 counterfact --data $CF --limit 100 --method emmet
  run cf100-emmet-mu0.001 1,10,100 counterfact --data $CF --limit 100 --method emmet --set mu=0.001
  run cf100-rome 1 counterfact --data $CF --limit 100 --method rome
  run cf100-memit-fluency 100 counterfact --data $CF --limit 100 --method memit --fluency
  run cf100-rome-fluency 1 counterfact --data $CF --limit 100 --method rome --fluency
}
ft100() {  # fine-tuning editors, 100 edits trained together (mass); random facts from counterfact-train's true facts
  run cf100-ft 100 counterfact --data $CF --limit 100 --method ft
  run cf100-ftc 100 counterfact --data $CF --limit 100 --method ft-conditional --set augment=false  # plain conditional FT
  run cf100-ftc-aug 100 counterfact --data $CF --limit 100 --method ft-conditional \
    --set n_paraphrases=2 --set n_random_facts=2 --set facts_file=$DATA/counterfact/counterfact-train.json
  run cf100-lora 100 counterfact --data $CF --limit 100 --method lora
}
ft100single() {  # each edit trained alone on the original model (random facts from counterfact-train's true facts)
  run cf100-ftc-aug-single 1 counterfact --data $CF --limit 100 --method ft-conditional \
    --set n_paraphrases=2 --set n_random_facts=2 --set facts_file=$DATA/counterfact/counterfact-train.json
  run cf100-ftc-single 1 counterfact --data $CF --limit 100 --method ft-conditional --set augment=false  # plain conditional FT
  run cf100-ft-single 1 counterfact --data $CF --limit 100 --method ft
  run cf100-lora-single 1 counterfact --data $CF --limit 100 --method lora
}
seq100() {  # sequential: batches of 10 each on top of the earlier ones (ROME in batches = ROME sequential)
  run cf100-memit-seq10 10 counterfact --data $CF --limit 100 --method memit --sequential
  run cf100-rome-b10 10 counterfact --data $CF --limit 100 --method rome
  run cf100-rome-b100 100 counterfact --data $CF --limit 100 --method rome  # all 100 one after another
  run cf100-emmet-mu0.001-seq10 10 counterfact --data $CF --limit 100 --method emmet --set mu=0.001 --sequential
}
zsre100() {
  run zsre100-memit 1,100 zsre --data $ZSRE --limit 100 --method memit
  run zsre100-emmet-mu0.001 100 zsre --data $ZSRE --limit 100 --method emmet --set mu=0.001
  run zsre100-rome 1 zsre --data $ZSRE --limit 100 --method rome
}
seqzsre100() {  # sequential on zsRE: batches of 10, each on top of the earlier ones (v* on the edited model)
  run zsre100-memit-seq10 10 zsre --data $ZSRE --limit 100 --method memit --sequential
  run zsre100-rome-b10 10 zsre --data $ZSRE --limit 100 --method rome
  run zsre100-rome-b100 100 zsre --data $ZSRE --limit 100 --method rome
  run zsre100-emmet-mu0.001-seq10 10 zsre --data $ZSRE --limit 100 --method emmet --set mu=0.001 --sequential
}
ftzsre100() {  # fine-tuning editors on zsRE, 100 edits trained together; random facts: counterfact-train's true
  # facts, as on CounterFact (zsRE-500 has no training split, and 10 of its records carry no true answer)
  run zsre100-ftc-aug 100 zsre --data $ZSRE --limit 100 --method ft-conditional \
    --set n_paraphrases=2 --set n_random_facts=2 --set facts_file=$DATA/counterfact/counterfact-train.json
  run zsre100-ftc 100 zsre --data $ZSRE --limit 100 --method ft-conditional --set augment=false  # plain conditional FT
  run zsre100-ft 100 zsre --data $ZSRE --limit 100 --method ft
  run zsre100-lora 100 zsre --data $ZSRE --limit 100 --method lora
}
cf1000() {  # 1000 edits at once (the curves' last point; batch sizes 1-100 come from cf100), and ROME on each
  run cf1000-memit.b1000 1000 counterfact --data $CF --limit 1000 --method memit
  run cf1000-emmet-mu0.001.b1000 1000 counterfact --data $CF --limit 1000 --method emmet --set mu=0.001
  run cf1000-rome 1 counterfact --data $CF --limit 1000 --method rome  # each edit alone; v* shared with MEMIT's
  run cf1000-memit.b100 100 counterfact --data $CF --limit 1000 --method memit  # ten batches of 100
  run cf1000-emmet-mu0.001.b100 100 counterfact --data $CF --limit 1000 --method emmet --set mu=0.001
}
cf1000small() {  # batch sizes 1 and 10 on the 1000 records (every v* reused from cf1000's MEMIT run)
  run cf1000-memit 1,10 counterfact --data $CF --limit 1000 --method memit
  run cf1000-emmet-mu0.001 1,10 counterfact --data $CF --limit 1000 --method emmet --set mu=0.001
}
zsre500() {  # all 500 zsRE records: MEMIT computes the v* that ROME and EMMET then reuse (batch mode edits the
  # original model each time, so a request's v* is the same for every batch size)
  run zsre500-memit 100,500 zsre --data $ZSRE --method memit
  run zsre500-rome 1 zsre --data $ZSRE --method rome
  run zsre500-emmet-mu0.001 100,500 zsre --data $ZSRE --method emmet --set mu=0.001
}
ftzsre500() {  # fine-tuning editors on all 500 zsRE records, trained together (augmentation: ~80 min more on a CPU)
  run zsre500-ftc 500 zsre --data $ZSRE --method ft-conditional --set augment=false  # plain conditional FT
  run zsre500-ft 500 zsre --data $ZSRE --method ft
  run zsre500-lora 500 zsre --data $ZSRE --method lora
  run zsre500-ftc-aug 500 zsre --data $ZSRE --method ft-conditional \
    --set n_paraphrases=2 --set n_random_facts=2 --set facts_file=$DATA/counterfact/counterfact-train.json
}
ft1000() {  # FT-conditional + augmentation, 1000 edits trained together (issue 5's comparison with cf1000-memit.b1000)
  run cf1000-ftc-aug 1000 counterfact --data $CF --limit 1000 --method ft-conditional \
    --set n_paraphrases=2 --set n_random_facts=2 --set facts_file=$DATA/counterfact/counterfact-train.json
}

seq1000() {  # sequential at 1000 edits: ten batches of 100, each on top of the earlier ones (fresh v* on the
  # edited model for batches 2-10; the first batch's v* come from cf1000). ROME: 1000 edits one after another
  # (each v* on the model edited so far), journalled every 100; about 2 h here.
  run cf1000-memit-seq100 100 counterfact --data $CF --limit 1000 --method memit --sequential
  run cf1000-emmet-mu0.001-seq100 100 counterfact --data $CF --limit 1000 --method emmet --set mu=0.001 --sequential
  run cf1000-rome-seq100 100 counterfact --data $CF --limit 1000 --method rome --sequential
}
seqzsre500() {  # sequential on all 500 zsRE records: five batches of 100, each on top of the earlier ones
  run zsre500-memit-seq100 100 zsre --data $ZSRE --method memit --sequential
  run zsre500-emmet-mu0.001-seq100 100 zsre --data $ZSRE --method emmet --set mu=0.001 --sequential
  run zsre500-rome-seq100 100 zsre --data $ZSRE --method rome --sequential  # 500 edits one after another
}

zsrelambda() {  # MEMIT's λ on zsRE (the default 500 was chosen on CounterFact): batch 100 on the first 100 records
  run zsre100-memit-lambda5000 100 zsre --data $ZSRE --limit 100 --method memit --set mom2_weight=5000
  run zsre100-memit-lambda50000 100 zsre --data $ZSRE --limit 100 --method memit --set mom2_weight=50000
}

ft1000base() {  # the FT baselines at 1000 edits trained together, beside cf1000-ftc-aug and cf1000-memit.b1000
  run cf1000-ftc 1000 counterfact --data $CF --limit 1000 --method ft-conditional --set augment=false  # plain conditional FT
  run cf1000-ft 1000 counterfact --data $CF --limit 1000 --method ft
  run cf1000-lora 1000 counterfact --data $CF --limit 1000 --method lora
}

stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(cf100 ft100 ft100single seq100 zsre100 seqzsre100 ftzsre100 cf1000 cf1000small zsre500 ftzsre500 ft1000 ft1000base seq1000 seqzsre500 zsrelambda)
for s in "${stages[@]}"; do "$s"; done
