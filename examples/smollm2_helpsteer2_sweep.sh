#!/usr/bin/env bash
# Learning rate and SFT weight for examples/smollm2_helpsteer2_arms.sh, chosen on a VALIDATION split (never the
# held-out one), at the arms' exact budget: the same training groups, steps and seed as every arm.
#
# SmolLM2-135M-Instruct, AMoPO gaussian, one run per LR:SFT_WEIGHT of CONFIGS, each evaluated on the validation
# prompts. The rule, fixed before any run: drop runs whose mean log-probability per chosen-response token on
# validation fell more than GUARD nats below the untrained model's (a pair loss can widen margins by pushing both
# responses down, which destroys generation); of the rest, the highest validation accuracy over all pairs, ties
# broken by the mean margin. Writes $OUT/chosen.env (LR, SFT, RUN) for the arms script; the chosen run is the
# arms' gaussian arm. Run from the repository root after `make install`.
set -euo pipefail

OUT=${OUT:-runs/smollm2_helpsteer2}
CONFIGS=${CONFIGS:-"2e-4:0 2e-4:1"}
VALID_PROMPTS=${VALID_PROMPTS:-0}   # 0: every usable validation prompt
GUARD=${GUARD:-0.3}
# shellcheck source=examples/lib/smollm2_helpsteer2.sh
source "$(dirname "$0")/lib/smollm2_helpsteer2.sh"

mkdir -p "$OUT"
prepare_model
split_rows
SOURCE_ROWS=$OUT/split/train.jsonl select_rows train "$TRAIN_PROMPTS" 0
SOURCE_ROWS=$OUT/split/valid.jsonl select_rows valid "$VALID_PROMPTS" 0
preprocess train
preprocess valid
[[ -f $OUT/groups_valid_untrained.jsonl ]] || evaluate "$OUT/megatron_init" "$OUT/data_valid" valid_untrained
names=()
for cfg in $CONFIGS; do
  lr=${cfg%%:*} sft=${cfg##*:}
  name=gaussian_lr${lr}_sft${sft}
  names+=("$name")
  [[ -f $OUT/groups_valid_$name.jsonl ]] && continue
  rm -rf "${OUT:?}/$name"
  train "$name" "$OUT/megatron_init" "$OUT/data_train" --lr "$lr" --amopo-sft-weight "$sft" \
    --amopo-weighting gaussian
  evaluate "$OUT/$name" "$OUT/data_valid" "valid_$name"
done
arms=()
for name in "${names[@]}"; do arms+=(--arm "$name=$OUT/groups_valid_$name.jsonl"); done
$PYTHON tools/compare_evals.py --baseline "$OUT/groups_valid_untrained.jsonl" "${arms[@]}" \
  --output "$OUT/table_valid.md"
$PYTHON - "$OUT" "$GUARD" "${names[@]}" <<'PY' | tee "$OUT/sweep.md"
import json, re, sys
out, guard, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
ev = lambda n: json.load(open(f"{out}/eval_valid_{n}.json"))
base = ev("untrained")
print("| run | validation log-prob chosen / rejected (per token) | accuracy (all pairs) | margin (all) | guard |")
print("|---|---|---|---|---|")
print(f"| untrained | {base['logp_chosen/all']:.3f} / {base['logp_rejected/all']:.3f} | "
      f"{base['accuracy/all']:.3f} | {base['margin/all']:.3f} | |")
kept = []
for n in names:
    v = ev(n)
    ok = v["logp_chosen/all"] >= base["logp_chosen/all"] - guard
    print(f"| {n} | {v['logp_chosen/all']:.3f} / {v['logp_rejected/all']:.3f} | {v['accuracy/all']:.3f} | "
          f"{v['margin/all']:.3f} | {'pass' if ok else 'fail'} |")
    if ok:
        kept.append((v["accuracy/all"], v["margin/all"], n))
if not kept:
    sys.exit(f"no run passed the log-prob guard ({guard} nat/token): try lower learning rates or a larger SFT weight")
run = max(kept)[2]
lr, sft = re.fullmatch(r"gaussian_lr(.+)_sft(.+)", run).groups()
open(f"{out}/chosen.env", "w").write(f"LR={lr}\nSFT={sft}\nRUN={run}\n")
print(f"\nchosen: {run} (lr {lr}, SFT weight {sft})")
PY
