"""Run `llamafactory-cli train CONFIG` and time it: start-up, steps, tokens, peak GPU memory.

    python3 run_train.py CONFIG.yaml SUMMARY.json [LOG]

The trainer's output is copied to stdout (and LOG) with the elapsed seconds in front of each
line; nvidia-smi is sampled every 0.5 s for the GPU memory in use (the whole GPU: the
trainer's CUDA context and PyTorch's cache included). SUMMARY.json gets the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml


def _gpu_mem_sampler(stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):  # a missed sample is fine
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=False).stdout
            samples.append(int(out.split()[0]))
        stop.wait(0.5)


def main() -> None:
    config, summary_path = Path(sys.argv[1]), Path(sys.argv[2])
    log = open(sys.argv[3], "w", encoding="utf-8") if len(sys.argv) > 3 else None  # noqa: SIM115
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_gpu_mem_sampler, args=(stop, samples), daemon=True)
    sampler.start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # `python3 -m llamafactory.cli` is what the llamafactory-cli console script runs
    cmd = [sys.executable, "-m", "llamafactory.cli", "train", str(config)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    marks: dict[str, float] = {}
    buf = b""
    step_re = re.compile(r"\b(\d+)/(\d+) \[")

    def handle(line: str) -> None:
        t = time.time() - t0
        out = f"[{t:7.1f}s] {line}"
        print(out, flush=True)
        if log:
            log.write(out + "\n")
        if "Running training" in line and "train_begin" not in marks:
            marks["train_begin"] = t
        m = step_re.search(line)
        if m and "train_begin" in marks and marks.setdefault("total_steps", int(m.group(2))) == int(m.group(2)):
            step = int(m.group(1))
            if step >= 1 and "first_step" not in marks:
                marks["first_step"] = t
            if step >= 11 and "step_11" not in marks:
                marks["step_11"] = t
            marks["last_step"] = t
            marks["last_step_n"] = step

    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for part in parts:
            if part.strip():
                handle(part.decode("utf-8", "replace"))
    if buf.strip():
        handle(buf.decode("utf-8", "replace"))
    rc = proc.wait()
    wall = time.time() - t0
    stop.set()
    sampler.join(timeout=2)
    out_dir = Path(cfg["output_dir"])
    adapter = out_dir / "adapter_model.safetensors"
    state = out_dir / "trainer_state.json"
    log_history = json.loads(state.read_text())["log_history"] if state.is_file() else []
    loss_points = [h["loss"] for h in log_history if "loss" in h]
    tps = [h["train_tokens_per_second"] for h in log_history if "train_tokens_per_second" in h]
    results_file = out_dir / "all_results.json"
    summary = {
        "rc": rc, "wall_s": round(wall, 1), "marks_s": {k: round(v, 1) for k, v in marks.items()},
        "all_results": json.loads(results_file.read_text()) if results_file.is_file() else None,
        "last_logged_train_tokens_per_second": tps[-1] if tps else None,
        "first_logged_loss": loss_points[0] if loss_points else None,
        "last_logged_loss": loss_points[-1] if loss_points else None,
        "loss_points": loss_points,
        "peak_gpu_mem_mib": max(samples) if samples else None,
        "idle_gpu_mem_mib": samples[0] if samples else None,
        "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
        "output_files": sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else [],
        "config": cfg,
    }
    if "first_step" in marks and "last_step" in marks and marks.get("last_step_n", 0) > 1:
        summary["steady_steps_per_s"] = round((marks["last_step_n"] - 1) / (marks["last_step"] - marks["first_step"]), 3)
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "loss_points")}, indent=2))
    sys.exit(rc)


if __name__ == "__main__":
    main()
