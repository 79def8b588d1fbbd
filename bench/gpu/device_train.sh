#!/bin/bash
# Step 1 on the GPU machine (run from the repository root, $OUT = a folder for results):
# install the carried LLaMA-Factory stack, make the model + data, train the LoRA adapter.
# Carried: .whl/ (wheels, see README.md), .gpuwork/tokenizer (a saved 32k tokenizer; optional),
# .gpuwork/pa (first part of the vLLM bundle, kept in /tmp/parts for step 2; optional).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
W=/tmp/gpuwork; OUT=${OUT:-/tmp/gpuout}; mkdir -p "$W" "$OUT" /tmp/parts
[ -d .gpuwork/pa ] && cp .gpuwork/pa/* /tmp/parts/
date -u +%FT%TZ > "$OUT/env.txt"; nvidia-smi >> "$OUT/env.txt"; nproc >> "$OUT/env.txt"
t=$(date +%s.%N)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
echo "pip install of the carried wheels: $(python3 -c "print(round($(date +%s.%N) - $t, 1))") s" >> "$OUT/env.txt"
export PYTHONPATH=/tmp/site
python3 - >> "$OUT/env.txt" <<'PY'
import sys, importlib.metadata as md
print(sys.version)
for n in ["torch", "transformers", "tokenizers", "peft", "trl", "datasets", "accelerate", "llamafactory", "triton", "numpy", "safetensors", "huggingface_hub"]:
    print(n, md.version(n))
import torch; print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
TOK=""; [ -d .gpuwork/tokenizer ] && TOK="--tokenizer .gpuwork/tokenizer"
python3 bench/gpu/make_model_data.py "$W" --rows 4000 $TOK > "$OUT/make_model.txt" 2>&1 || { cat "$OUT/make_model.txt"; exit 4; }
tail -1 "$OUT/make_model.txt"
timeout 450 python3 bench/gpu/run_train.py bench/gpu/train_lora.yaml "$OUT/train_summary.json" "$OUT/train_log.txt" > /dev/null
echo "train rc=$?"
ls -la "$W/run-1" 2>&1 | head -30
# a random LoRA adapter as a stand-in, only if training left none (step 2 then says so)
if [ ! -f "$W/run-1/adapter_model.safetensors" ]; then
python3 - <<'PY'
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/tmp/gpuwork/model")
get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).save_pretrained("/tmp/gpuwork/fallback-adapter")
print("made /tmp/gpuwork/fallback-adapter")
PY
fi
cat "$OUT/train_summary.json" 2>/dev/null | head -60
