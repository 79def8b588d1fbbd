"""Write train_lora.yaml with the portal's own compiler (LLaMA Board form values -> YAML).

Run where the portal is installed (it builds LLaMA Board's form for its defaults, ~10 s):

    .venv/bin/python bench/gpu/make_yaml.py [WORK_DIR]   # default WORK_DIR /tmp/gpuwork

The form values are what a user would fill in for a LoRA SFT run of the benchmark model; the
only extra args are the ones a GPU benchmark needs (no MLflow on the GPU machine, a bigger
logging interval). The portal's per-user path rewriting is not applied: paths point at WORK_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llamaboard_ext.compile import args_to_yaml, form_to_args
from llamaboard_ext.form import form_defaults


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpuwork"
    values = {
        "top.model_name": "Custom",
        "top.model_path": f"{work}/model",
        "top.finetuning_type": "lora",
        "top.template": "qwen",
        "train.training_stage": "Supervised Fine-Tuning",
        "train.dataset_dir": f"{work}/data",
        "train.dataset": ["gpu_alpaca"],
        "train.cutoff_len": 1024,
        "train.learning_rate": "1e-4",
        "train.num_train_epochs": "1.0",
        "train.max_samples": "100000",
        "train.batch_size": 8,
        "train.gradient_accumulation_steps": 2,
        "train.logging_steps": 10,
        "train.save_steps": 1000,
        "train.lora_rank": 16,
        "train.lora_alpha": 32,
        "train.output_dir": "run-1",
        "train.extra_args": json.dumps({"report_to": "none", "output_dir": f"{work}/run-1"}),
    }
    args = form_to_args(values, form_defaults())
    text = args_to_yaml(args, header="LoRA SFT benchmark config, made by bench/gpu/make_yaml.py with the portal's compiler")
    out = Path(__file__).with_name("train_lora.yaml")
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
