#!/usr/bin/env bash
# The experiment of docs/RESULTS.md: SmolLM2-135M-Instruct aligned on HelpSteer2 prompts on 2 CPU processes,
# four arms at the same budget and seed, evaluated per dimension on held-out prompts, plus controllability.
#
#   arms: AMoPO gaussian (published code), AMoPO gaussian-inverse (paper text), AMoPO equal weights, and
#         single-objective SimPO on the general pair only (--amopo-weighting fixed 1 0 ... 0: the dimension
#         pairs are computed but get weight 0, so every arm costs the same tokens)
#   learning rate and SFT weight: examples/smollm2_helpsteer2_sweep.sh (run first) chose them on the validation
#         split; its chosen run is the gaussian arm (same groups, steps, seed and flags)
#   held-out: the held-out prompts of the same split, used for nothing but this evaluation
#   controllability: greedy replies at requested verbosity 0, 2, 4 before and after the gaussian arm
# Run from the repository root after `make install` and the sweep.
set -euo pipefail

OUT=${OUT:-runs/smollm2_helpsteer2}
HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-0}  # 0: every usable held-out prompt
CONTROL_PROMPTS=${CONTROL_PROMPTS:-12}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}  # greedy replies of this model often loop: a low cap makes every length equal
ARMS=${ARMS:-"gaussian gaussian-inverse equal simpo"}
# shellcheck source=examples/lib/smollm2_helpsteer2.sh
source "$(dirname "$0")/lib/smollm2_helpsteer2.sh"
# shellcheck disable=SC2206
DIMS=($DIMENSIONS)

[[ -f $OUT/chosen.env ]] || { echo "missing $OUT/chosen.env: run examples/smollm2_helpsteer2_sweep.sh first" >&2; exit 1; }
# shellcheck disable=SC1091
source "$OUT/chosen.env"  # LR, SFT, RUN
SOURCE_ROWS=$OUT/split/heldout.jsonl select_rows heldout "$HELDOUT_PROMPTS" 0
preprocess heldout

control() {  # control MODEL NAME
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PYTHON tools/evaluate_control.py --model "$1" \
    --input "$OUT/heldout.jsonl" --dimension verbosity --scores 0 2 4 --num-prompts "$CONTROL_PROMPTS" \
    --max-new-tokens "$MAX_NEW_TOKENS" --output "$OUT/control_$2.json"
}
run_dir() { if [[ $1 == gaussian ]]; then echo "$OUT/$RUN"; else echo "$OUT/$1"; fi; }

[[ -f $OUT/groups_untrained.jsonl ]] || evaluate "$OUT/megatron_init" "$OUT/data_heldout" untrained
[[ -f $OUT/control_untrained.json ]] || control "${HF_INIT:-$OUT/hf_init}" untrained
for arm in $ARMS; do
  [[ -f $OUT/groups_$arm.jsonl ]] && continue
  if [[ $arm != gaussian ]]; then
    case $arm in
      simpo)  # SimPO on the general pair: weight 1 on pair 0, 0 on every dimension pair
        zeros=()
        for _ in "${DIMS[@]}"; do zeros+=(0); done
        weighting=(--amopo-weighting fixed --amopo-fixed-weights 1 "${zeros[@]}") ;;
      *) weighting=(--amopo-weighting "$arm") ;;
    esac
    rm -rf "${OUT:?}/$arm"
    train "$arm" "$OUT/megatron_init" "$OUT/data_train" --lr "$LR" --amopo-sft-weight "$SFT" "${weighting[@]}"
  fi
  evaluate "$(run_dir "$arm")" "$OUT/data_heldout" "$arm"
  if [[ $arm == gaussian ]]; then
    $PYTHON tools/convert_megatron_to_hf.py --load "$(run_dir gaussian)" --save "$OUT/hf_gaussian" --overwrite
    control "$OUT/hf_gaussian" gaussian
  fi
done

table=()
for arm in $ARMS; do table+=(--arm "$arm=$OUT/groups_$arm.jsonl"); done
$PYTHON tools/compare_evals.py --baseline "$OUT/groups_untrained.jsonl" "${table[@]}" --output "$OUT/table.md"
runs=()
for arm in $ARMS; do runs+=("$arm=$(run_dir "$arm")"); done
$PYTHON - "$OUT" "$SEED" "$LR" "$SFT" "${runs[@]}" <<'PY' | tee "$OUT/runs.md"
import json, sys
from megatron_amopo.evaluation.control import summarize_control
out, seed, lr, sft, runs = *sys.argv[1:5], sys.argv[5:]
ev = lambda n: json.load(open(f"{out}/eval_{n}.json"))
base = ev("untrained")
print("| arm | lr | SFT weight | steps | groups | training tokens | training wall time (s) | seed "
      "| held-out log-prob chosen / rejected (per token) |\n|---|---|---|---|---|---|---|---|---|")
print(f"| untrained | | | 0 | 0 | 0 | | | {base['logp_chosen/all']:.3f} / {base['logp_rejected/all']:.3f} |")
for arm, path in (r.split("=", 1) for r in runs):
    train = [r for r in map(json.loads, open(f"{path}/metrics.jsonl")) if r["kind"] == "train"]
    wall = open(f"{path}/wall_s").read().strip()
    v = ev(arm)
    print(f"| {arm} | {lr} | {sft} | {len(train)} | {int(train[-1]['consumed_samples'])} "
          f"| {int(sum(r['tokens'] for r in train)):,} | {wall} | {seed} "
          f"| {v['logp_chosen/all']:.3f} / {v['logp_rejected/all']:.3f} |")
print("\n| model | replies | mean length at verbosity 0 / 2 / 4 (tokens) | capped (0 / 2 / 4) "
      "| prompts with the same reply at every level | Spearman |\n|---|---|---|---|---|---|")
for name in ("untrained", "gaussian"):
    c = json.load(open(f"{out}/control_{name}.json"))
    s = summarize_control(c["replies"], c["scores"])  # also reads control files written before its newer fields
    lens = " / ".join(f"{v['mean_length']:.1f}" for v in s["per_score"].values())
    capped = " / ".join(str(v["at_max_new_tokens"]) for v in s["per_score"].values())
    same = f"{s['prompts_same_reply_at_every_score']} of {s['prompts']}"
    rho = s["spearman_score_length"]
    rho = "undefined" if rho != rho else f"{rho:.3f}"
    print(f"| {name} | {s['num_replies']} | {lens} | {capped} | {same} | {rho} |")
PY
