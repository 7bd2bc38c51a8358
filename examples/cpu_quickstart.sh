#!/usr/bin/env bash
# CPU quickstart: the whole AMoPO pipeline on a tiny Qwen2-architecture model with the
# bundled real Qwen2 tokenizer and real HelpSteer2 rows, on 2 CPU processes (TP=2).
#   make tiny HF model -> convert to Megatron -> preprocess -> train (eval before/after)
#   -> export to HF -> generate with a dimension-aware prompt -> plots
# Run from the repository root (`make demo` sets up .venv first).
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-"$PYTHON -m torch.distributed.run"}
# torchrun sets 1 per worker anyway, with a banner on every launch; saying so here keeps the console quiet
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-runs/quickstart}
NPROC=${NPROC:-2}
NUM_PROMPTS=${NUM_PROMPTS:-32}   # the shortest HelpSteer2 prompts: keeps the demo within minutes on 2 cores
SEQ_LENGTH=${SEQ_LENGTH:-320}
EPOCHS=${EPOCHS:-3}
LR=${LR:-1e-3}

rm -rf "$OUT"
mkdir -p "$OUT"
echo "== 1/7 tiny Qwen2 model with the real Qwen2 tokenizer"
$PYTHON tools/make_tiny_model.py --arch qwen2 --tied --tokenizer data/tokenizer-qwen2 --vocab-size 151680 \
    --hidden-size 64 --num-layers 2 --out "$OUT/hf_init"

echo "== 2/7 Hugging Face -> Megatron"
$PYTHON tools/convert_hf_to_megatron.py --hf-path "$OUT/hf_init" --save "$OUT/megatron_init"

echo "== 3/7 the $NUM_PROMPTS shortest HelpSteer2 prompts (both rated responses) -> AMoPO groups"
$PYTHON - "$NUM_PROMPTS" "$OUT/rows.jsonl" <<'PY'
import collections, json, sys
n, out = int(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in open("data/helpsteer2/train_rows.jsonl")]
by_prompt = collections.defaultdict(list)
for row in rows:
    by_prompt[row["prompt"]].append(row)
pairs = [rs for rs in by_prompt.values() if len(rs) == 2]
pairs.sort(key=lambda rs: len(rs[0]["prompt"]) + max(len(r["response"]) for r in rs))
with open(out, "w") as fh:
    for rs in pairs[:n]:
        for r in rs:
            fh.write(json.dumps(r) + "\n")
PY
$PYTHON tools/preprocess_data.py --input "$OUT/rows.jsonl" --output "$OUT/data" --tokenizer "$OUT/megatron_init/tokenizer" \
    --format helpsteer2 --seq-length "$SEQ_LENGTH" --no-progress

echo "== 4/7 AMoPO training, TP=2 on $NPROC processes (evaluated on its training pairs before and after)"
$TORCHRUN --nproc-per-node "$NPROC" pretrain_amopo.py \
    --load "$OUT/megatron_init" --save "$OUT/run" --data-path "$OUT/data" --valid-data-path "$OUT/data" \
    --tensor-model-parallel-size 2 --micro-batch-size 2 --global-batch-size 4 --train-epochs "$EPOCHS" \
    --seq-length "$SEQ_LENGTH" --lr "$LR" --lr-warmup-fraction 0.05 --clip-grad 3.0 \
    --eval-interval 1000000 --log-interval 4

echo "== 5/7 Megatron -> Hugging Face"
$PYTHON tools/convert_megatron_to_hf.py --load "$OUT/run" --save "$OUT/hf_aligned"

echo "== 6/7 generate with a dimension-aware prompt"
$PYTHON tools/generate.py --model "$OUT/hf_aligned" --prompt "Give me a one-line tip for boiling eggs." \
    --dimension helpfulness --score 4 --max-new-tokens 16

echo "== 7/7 plots"
$PYTHON tools/plot_metrics.py "$OUT/run"

cat <<DONE

Quickstart finished. Everything is under $OUT:
  $OUT/megatron_init     converted starting checkpoint
  $OUT/data              preprocessed AMoPO groups (metadata.json, skipped.json)
  $OUT/run               training checkpoints, metrics.jsonl, tensorboard/, config.yaml
  $OUT/run/plots         loss, weights, margins, accuracy PNGs
  $OUT/hf_aligned        the trained model in Hugging Face format
DONE
