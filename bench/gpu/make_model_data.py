"""Make a random-weight Qwen2 model (~0.4B parameters, bf16), its tokenizer and an alpaca dataset.

Nothing is downloaded: the byte-level BPE tokenizer (32k vocab, Qwen-style chat template and
special tokens) is trained here on generated pseudo-words, the weights are random (so the model
writes garbage; this is for timings only), the dataset is generated alpaca rows.

    python3 make_model_data.py OUT_DIR [--rows 4000] [--seed 0] [--tokenizer DIR]

writes OUT_DIR/model (config.json, model.safetensors, tokenizer files) and OUT_DIR/data
(gpu_alpaca.json + dataset_info.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

VOCAB = 32000
# Qwen2.5-0.5B's layer shapes (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV heads, tied
# embeddings) with a 32k instead of a 152k vocabulary: ~0.39B parameters instead of 0.49B.
MODEL_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
               "num_key_value_heads": 2, "max_position_embeddings": 4096, "rope_theta": 1000000.0,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's chat template (system, user, assistant turns; <|im_end|> ends each turn)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ie")]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))


def _text(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        w = _word(rng)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += "."
        elif rng.random() < 0.05:
            out[-1] += ","
    return " ".join(out) + "."


def make_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [_text(rng, rng.randint(20, 200)) for _ in range(60000)]
    corpus += [str(rng.randint(0, 10**9)) for _ in range(5000)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(target: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    # training the 32k BPE takes 1-3 minutes: reuse one saved by an earlier run when given
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else make_tokenizer(seed)
    t_tok = time.time() - t0
    config = Qwen2Config(vocab_size=VOCAB, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id, torch_dtype="bfloat16", **MODEL_SHAPE)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    gen = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    (target / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return {"params": params, "tokenizer_len": len(tok), "tokenizer_s": round(t_tok, 1),
            "total_s": round(time.time() - t0, 1)}


def make_data(target: Path, rows: int, seed: int = 0) -> dict:
    """Alpaca rows: an instruction, an input of 20-300 words, an output of 20-400 words."""
    rng = random.Random(seed + 1)
    data = []
    for _ in range(rows):
        data.append({"instruction": _text(rng, rng.randint(5, 25)),
                     "input": _text(rng, rng.randint(20, 300)) if rng.random() < 0.7 else "",
                     "output": _text(rng, rng.randint(20, 400))})
    target.mkdir(parents=True, exist_ok=True)
    (target / "gpu_alpaca.json").write_text(json.dumps(data), encoding="utf-8")
    (target / "dataset_info.json").write_text(json.dumps({"gpu_alpaca": {"file_name": "gpu_alpaca.json"}}, indent=2),
                                              encoding="utf-8")
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer saved by an earlier run")
    args = parser.parse_args()
    info = {"data": make_data(args.out / "data", args.rows, args.seed)}
    if not args.data_only:
        info["model"] = make_model(args.out / "model", args.seed, args.tokenizer)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
