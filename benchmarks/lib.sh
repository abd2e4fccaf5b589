# Shared by the benchmark scripts (source it after setting OUT, from the repository root): the data files and
# one lmedit eval per result group.
# run OUTPUT_STEM SIZES TASK ARGS...  — SIZES is one batch size (→ OUT/STEM.json) or a comma list
# (→ OUT/STEM.bN.json for each N, one command). A group whose result files all exist is skipped; an
# interrupted one resumes from its journal; v* already optimised for the same request are reused from the cache.
LM=${LM:-.venv/bin/lmedit}
DATA=../shared/data
CF=$DATA/counterfact/counterfact-edit.json
ZSRE=$DATA/zsre/zsre-500.json
mkdir -p "$OUT"
run() {
  local stem=$1 sizes=$2 task=$3; shift 3
  local missing=0
  if [[ $sizes == *,* ]]; then
    for b in ${sizes//,/ }; do [[ -f $OUT/$stem.b$b.json ]] || missing=1; done
  else
    [[ -f $OUT/$stem.json ]] || missing=1
  fi
  if [[ $missing == 0 ]]; then echo "== $stem: done"; return; fi
  echo "== $stem ($(date +%T))"
  /usr/bin/time -f "== $stem: %e s wall, %M KB peak" \
    $LM eval "$task" --batch-size "$sizes" --out "$OUT/$stem.json" --resume "$@"
}
