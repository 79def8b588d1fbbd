"""Start an OpenAI-compatible server on the benchmark model and probe it; print/write JSON.

    python3 serve_probe.py vllm MODEL_DIR ADAPTER_DIR OUT.json [--max-lora-rank 16]
    python3 serve_probe.py llamafactory MODEL_DIR ADAPTER_DIR OUT.json

vllm: `vllm serve MODEL_DIR --enable-lora ...` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; then
the runtime LoRA endpoints (load, load again, bad path, unload, unload again), /v1/models
before/after, streamed chats (time to first token, tokens/s; median of 20) on the base model
and on the adapter, chats to an unloaded and to an unknown name. Every response of the LoRA
endpoints and of the error cases is kept verbatim (status and body).
llamafactory: `llamafactory-cli api` (huggingface backend, the adapter merged at load time),
the same chat timings. The random-weight model writes garbage; each answer is forced to the
same length (max_tokens = min_tokens, ignore_eos) where the server supports it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PORT = 8011
BASE = f"http://127.0.0.1:{PORT}"
N_TOKENS = 128
PROMPT = "Explain in detail what a loan-to-value ratio is and why a bank cares about it."


def verbatim(r: httpx.Response, seconds: float | None = None) -> dict:
    out = {"status": r.status_code, "body": r.text}
    if "content-type" in r.headers:
        out["content_type"] = r.headers["content-type"]
    if seconds is not None:
        out["seconds"] = round(seconds, 4)
    return out


def timed(method: str, path: str, **kw) -> dict:
    t = time.perf_counter()
    r = httpx.request(method, BASE + path, timeout=120, **kw)
    return verbatim(r, time.perf_counter() - t)


def stream_once(model: str, forced_len: bool) -> dict:
    try:
        return _stream_once(model, forced_len)
    except httpx.HTTPError as err:
        return {"error": {"exception": f"{type(err).__name__}: {err}"}}


def _stream_once(model: str, forced_len: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": N_TOKENS,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    if forced_len:
        body.update({"ignore_eos": True, "min_tokens": N_TOKENS})
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    with httpx.stream("POST", BASE + "/v1/chat/completions", json=body, timeout=30) as r:
        if r.status_code != 200:
            r.read()
            return {"error": verbatim(r)}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            for c in d.get("choices", []):
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    n = (usage or {}).get("completion_tokens") or chunks
    ttft = (first - t0) if first else None
    decode_tps = (n - 1) / (end - first) if first and n > 1 and end > first else None
    return {"ttft_s": ttft, "total_s": end - t0, "completion_tokens": n, "chunks": chunks, "decode_tok_per_s": decode_tps}


def chat_series(model: str, forced_len: bool, n: int = 20, warmup: int = 2) -> dict:
    for _ in range(warmup):
        stream_once(model, forced_len)
    runs = [stream_once(model, forced_len) for _ in range(n)]
    errors = [r["error"] for r in runs if "error" in r]
    ok = [r for r in runs if "error" not in r and r["ttft_s"] is not None]
    if not ok:
        return {"n": n, "errors": errors[:2]}
    med = lambda key: round(statistics.median(r[key] for r in ok if r[key] is not None), 4)
    return {"n": len(ok), "median_ttft_s": med("ttft_s"), "median_total_s": med("total_s"),
            "median_decode_tok_per_s": med("decode_tok_per_s"),
            "p90_ttft_s": round(sorted(r["ttft_s"] for r in ok)[int(0.9 * (len(ok) - 1))], 4),
            "completion_tokens": sorted({r["completion_tokens"] for r in ok}), "errors": errors[:2]}


def concurrent(model: str, forced_len: bool, users: int = 16) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def one() -> None:
        r = stream_once(model, forced_len)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    toks = sum(r["completion_tokens"] for r in ok)
    return {"users": users, "ok": len(ok), "wall_s": round(wall, 3), "aggregate_tok_per_s": round(toks / wall, 1),
            "median_ttft_s": round(statistics.median(r["ttft_s"] for r in ok), 4) if ok else None}


def wait_up(proc: subprocess.Popen, limit: float) -> float | None:
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            return None
        try:
            if httpx.get(BASE + "/v1/models", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def gpu_mem() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=False).stdout
        return int(out.split()[0])
    except Exception:  # noqa: BLE001
        return None


def probe_vllm(model: str, adapter: str, out: dict, log_dir: Path, rank: int) -> None:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"}
    base_cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--port", str(PORT),
                "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "4", "--max-model-len", "4096",
                "--gpu-memory-utilization", "0.85"]
    attempts = [("default (torch.compile + CUDA graphs)", base_cmd), ("--enforce-eager", base_cmd + ["--enforce-eager"])]
    proc = None
    for label, cmd in attempts:
        log = open(log_dir / f"vllm_server_{'eager' if 'eager' in label else 'default'}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        up = wait_up(proc, 300)
        out.setdefault("server_attempts", []).append({"mode": label, "command": " ".join(cmd), "ready_s": up,
                                                      "exit_code": proc.poll()})
        print(json.dumps(out["server_attempts"][-1]), flush=True)
        if up is not None:
            out["server_mode"] = label
            out["server_start_s"] = round(up, 1)
            break
        stop(proc)
        proc = None
    if proc is None:
        raise RuntimeError("vLLM did not start")
    try:
        out["gpu_mem_mib_after_start"] = gpu_mem()
        out["models_before"] = timed("GET", "/v1/models")
        out["load"] = timed("POST", "/v1/load_lora_adapter", json={"lora_name": "run-1", "lora_path": adapter})
        out["load_again_same_name"] = timed("POST", "/v1/load_lora_adapter", json={"lora_name": "run-1", "lora_path": adapter})
        out["load_bad_path"] = timed("POST", "/v1/load_lora_adapter",
                                     json={"lora_name": "run-bad", "lora_path": "/tmp/gpuwork/no-such-adapter"})
        out["load_missing_field"] = timed("POST", "/v1/load_lora_adapter", json={"lora_name": "run-x"})
        out["models_after_load"] = timed("GET", "/v1/models")
        body = {"model": "run-1", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
                "temperature": 0}
        out["chat_adapter_nonstream"] = timed("POST", "/v1/chat/completions", json=body)
        print("lora endpoints done", flush=True)
        out["stream_base"] = chat_series(model, True)
        out["stream_adapter"] = chat_series("run-1", True)
        print("series done", flush=True)
        out["concurrent16_base"] = concurrent(model, True)
        out["concurrent16_adapter"] = concurrent("run-1", True)
        out["load_second_adapter"] = timed("POST", "/v1/load_lora_adapter", json={"lora_name": "run-2", "lora_path": adapter})
        out["unload"] = timed("POST", "/v1/unload_lora_adapter", json={"lora_name": "run-1"})
        out["unload_again"] = timed("POST", "/v1/unload_lora_adapter", json={"lora_name": "run-1"})
        out["chat_unloaded_adapter"] = timed("POST", "/v1/chat/completions", json={**body, "model": "run-1"})
        out["chat_unknown_model"] = timed("POST", "/v1/chat/completions", json={**body, "model": "never-loaded"})
        out["models_after_unload"] = timed("GET", "/v1/models")
        out["reload_after_unload"] = timed("POST", "/v1/load_lora_adapter", json={"lora_name": "run-1", "lora_path": adapter})
        out["gpu_mem_mib_end"] = gpu_mem()
    finally:
        stop(proc)


def probe_llamafactory(model: str, adapter: str, out: dict, log_dir: Path) -> None:
    cfg = log_dir / "lf_api.yaml"
    cfg.write_text(f"model_name_or_path: {model}\nadapter_name_or_path: {adapter}\ntemplate: qwen\n"
                   "finetuning_type: lora\ninfer_backend: huggingface\ninfer_dtype: bfloat16\n", encoding="utf-8")
    env = {**os.environ, "API_PORT": str(PORT), "API_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "DISABLE_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "llamafactory.cli", "api", str(cfg)]
    log = open(log_dir / "lf_api_server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    up = wait_up(proc, 240)
    out["server_start_s"] = round(up, 1) if up else None
    out["command"] = " ".join(cmd)
    if up is None:
        stop(proc)
        raise RuntimeError("llamafactory api did not start")
    try:
        out["models"] = timed("GET", "/v1/models")
        name = json.loads(out["models"]["body"])["data"][0]["id"]
        out["load_lora_adapter_endpoint"] = timed("POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": adapter})
        out["stream_adapter_merged"] = chat_series(name, False, n=10, warmup=1)
    finally:
        stop(proc)


def main() -> None:
    kind, model, adapter, out_path = sys.argv[1:5]
    rank = int(sys.argv[sys.argv.index("--max-lora-rank") + 1]) if "--max-lora-rank" in sys.argv else 16
    out: dict = {"kind": kind, "model": model, "adapter": adapter, "max_tokens": N_TOKENS, "prompt": PROMPT}
    log_dir = Path(out_path).parent
    try:
        if kind == "vllm":
            import vllm

            out["vllm_version"] = vllm.__version__
            probe_vllm(model, adapter, out, log_dir, rank)
        else:
            probe_llamafactory(model, adapter, out, log_dir)
    except Exception as err:  # noqa: BLE001 - write what was measured, then the error
        out["error"] = f"{type(err).__name__}: {err}"
    Path(out_path).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(json.dumps(out, indent=2)[:20000])
    sys.exit(1 if "error" in out else 0)


if __name__ == "__main__":
    main()
