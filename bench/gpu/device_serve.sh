#!/bin/bash
# Step 2 on the GPU machine, same machine as step 1 (it reads /tmp/site, /tmp/gpuwork, /tmp/parts):
# assemble and unpack the vLLM bundle, probe `vllm serve` with runtime LoRA loading; if vLLM does
# not start, probe `llamafactory-cli api` (huggingface backend) instead.
# Carried: .gpuwork/pb (the rest of the vLLM bundle).
set -o pipefail
# FlashInfer is not carried (see README.md): without this vLLM 0.25.1 imports it for its sampler and fails
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DISABLE_VERSION_CHECK=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
W=/tmp/gpuwork; OUT=${OUT:-/tmp/gpuout}; mkdir -p "$OUT"
ADAPTER=$W/run-1; [ -f "$ADAPTER/adapter_model.safetensors" ] || ADAPTER=$W/fallback-adapter
[ -d .gpuwork/pb ] && cp .gpuwork/pb/* /tmp/parts/
if [ ! -d /tmp/vsite/vllm ]; then
  t=$(date +%s.%N)
  cat /tmp/parts/vsite.part* > /tmp/vsite.tar.xz && ls -la /tmp/vsite.tar.xz && sha256sum /tmp/vsite.tar.xz
  mkdir -p /tmp/vsite && tar -xJf /tmp/vsite.tar.xz -C /tmp/vsite || python3 -c "import tarfile; tarfile.open('/tmp/vsite.tar.xz').extractall('/tmp/vsite')"
  echo "bundle unpacked in $(python3 -c "print(round($(date +%s.%N) - $t, 1))") s"
fi
export PYTHONPATH=/tmp/vsite:/tmp/site
echo "adapter: $ADAPTER"
timeout 480 python3 bench/gpu/serve_probe.py vllm "$W/model" "$ADAPTER" "$OUT/vllm_probe.json" --max-lora-rank 16 > "$OUT/vllm_probe_stdout.txt" 2>&1
rc=$?; echo "vllm probe rc=$rc"; tail -c 3000 "$OUT/vllm_probe_stdout.txt"
if [ $rc -ne 0 ] && ! grep -q '"server_start_s"' "$OUT/vllm_probe.json" 2>/dev/null; then
  PYTHONPATH=/tmp/site:/tmp/vsite timeout 240 python3 bench/gpu/serve_probe.py llamafactory "$W/model" "$ADAPTER" "$OUT/lf_probe.json"
fi
