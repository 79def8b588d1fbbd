"""A tiny LLaMA and a toy alpaca dataset, made locally (no hub), for demos and tests.

The model is ~140k parameters: a byte-level BPE tokenizer trained on generated text and a
2-layer LlamaConfig. It trains in seconds on a CPU, which is all a demo or a test needs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_MODEL_NAME = "tiny-llama"
DEMO_DATASET_NAME = "demo_alpaca"
DEMO_TEMPLATE = "default"

_SUBJECTS = ["the bank", "a customer", "the analyst", "the model", "our team", "the report", "a loan", "the market"]
_VERBS = ["reviews", "approves", "explains", "summarises", "checks", "forecasts", "flags", "prices"]
_OBJECTS = ["the risk", "a transfer", "the balance", "an account", "the rate", "a payment", "the budget", "the trend"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Human: {{ message['content'] }}\nAssistant:"
    "{% else %} {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
)


def _sentences(rng: random.Random, count: int) -> list[str]:
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(count)]


def alpaca_rows(count: int = 200, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        sentence = _sentences(rng, 1)[0]
        rows.append({
            "instruction": "Repeat the sentence in capital letters.",
            "input": sentence,
            "output": sentence.upper(),
        })
    return rows


def make_tiny_model(target: Path, seed: int = 0) -> Path:
    """Write a tiny LLaMA (config, weights, tokenizer, chat template) to ``target``; idempotent."""
    target = Path(target)
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = _sentences(rng, 2000)
    corpus += [f"Human: Repeat the sentence in capital letters.\n{s}\nAssistant: {s.upper()}" for s in corpus[:500]]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = _CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(target)
    return target


def make_demo_dataset(dataset_dir: Path, rows: int = 200) -> Path:
    """Write the toy alpaca file and register it in ``dataset_dir/dataset_info.json``; idempotent."""
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    data_file = dataset_dir / f"{DEMO_DATASET_NAME}.json"
    if not data_file.is_file():
        data_file.write_text(json.dumps(alpaca_rows(rows), indent=1), encoding="utf-8")
    info_path = dataset_dir / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    info.setdefault(DEMO_DATASET_NAME, {"file_name": data_file.name})
    info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return data_file
