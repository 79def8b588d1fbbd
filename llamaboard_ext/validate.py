"""Check a train args dict the way `llamafactory-cli train` would, without loading a model.

Stricter than LLaMA-Factory's parser, never looser: its ``get_train_args`` accepts a string
learning rate or an unknown stage that only fail at run time, so types and choices are checked
first against its own dataclasses, then datasets and model folders on disk, then its parser.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

from llamafactory.extras.constants import DATA_CONFIG

from .arguments import KNOWN_KEYS, type_problems

_PARSER_LOCK = threading.Lock()  # get_train_args touches process-wide logging and seeds


def _count_rows(path: str) -> int:
    """Rows in a local dataset file (0 for an empty one); -1 when the format is not counted here."""
    lower = path.lower()
    if lower.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return len(data) if isinstance(data, list) else -1
    if lower.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    if lower.endswith(".csv"):
        with open(path, encoding="utf-8") as fh:
            return max(sum(1 for line in fh if line.strip()) - 1, 0)
    return -1 if os.path.getsize(path) else 0


def dataset_problems(args: dict[str, Any]) -> dict[str, str]:
    names = [d.strip() for d in str(args.get("dataset") or "").split(",") if d.strip()]
    if not names and not args.get("do_train") and (args.get("do_eval") or args.get("do_predict")):
        # a config that only evaluates or predicts (decision 0008) reads its eval_dataset alone
        names = [d.strip() for d in str(args.get("eval_dataset") or "").split(",") if d.strip()]
        if not names:
            return {"eval_dataset": "no dataset to evaluate on: name at least one eval_dataset"}
    if not names:
        return {"dataset": "no dataset: name at least one dataset"}
    dataset_dir = str(args.get("dataset_dir") or "data")
    info_path = os.path.join(dataset_dir, DATA_CONFIG)
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        return {"dataset_dir": f"{info_path} does not exist: the dataset folder has no {DATA_CONFIG}"}
    except (OSError, json.JSONDecodeError) as err:
        return {"dataset_dir": f"{info_path} cannot be read: {err}"}
    problems: dict[str, str] = {}
    for name in names:
        entry = info.get(name)
        if entry is None:
            problems["dataset"] = f"unknown dataset '{name}': choose one of {', '.join(sorted(info)) or '(none registered)'}"
            continue
        file_name = entry.get("file_name")
        if not file_name:
            continue  # hub or script datasets: checked by the policy, read by the job
        path = os.path.join(dataset_dir, file_name)
        if not os.path.exists(path):
            problems["dataset"] = f"dataset '{name}': its file {path} does not exist"
            continue
        if os.path.isfile(path):
            try:
                rows = _count_rows(path)
            except (OSError, ValueError) as err:
                problems["dataset"] = f"dataset '{name}': {path} cannot be parsed ({err})"
                continue
            if rows == 0:
                problems["dataset"] = f"dataset '{name}' is empty ({path} has no rows): add rows or pick another dataset"
    return problems


def model_problems(args: dict[str, Any]) -> dict[str, str]:
    path = str(args.get("model_name_or_path") or "")
    if not path:
        return {"model_name_or_path": "no model: set model_name_or_path to a model folder or a catalog model"}
    if os.path.isabs(path):
        if not os.path.isdir(path):
            return {"model_name_or_path": f"model folder {path} does not exist"}
        if not os.path.isfile(os.path.join(path, "config.json")):
            return {"model_name_or_path": f"{path} is not a model folder (no config.json in it)"}
    return {}


_KEY_IN_MESSAGE = re.compile(r"`?([a-z_][a-z0-9_]+)`?")


def _key_for_message(message: str) -> str:
    for match in _KEY_IN_MESSAGE.finditer(message):
        if match.group(1) in KNOWN_KEYS and len(match.group(1)) > 3:
            return match.group(1)
    return "config"


def _logs_to_stderr() -> None:
    """LLaMA-Factory logs to stdout; in the portal's processes stdout is for results (CLI --json)."""
    import logging
    import sys

    for handler in logging.getLogger("llamafactory").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def parser_problems(args: dict[str, Any], *, export: bool = False) -> dict[str, str]:
    """Run LLaMA-Factory's own ``get_train_args`` (``export``: ``get_infer_args``, what
    `llamafactory-cli export` parses); no model is loaded."""
    from llamafactory.hparams import get_infer_args, get_train_args

    _logs_to_stderr()
    with _PARSER_LOCK:
        try:
            (get_infer_args if export else get_train_args)(dict(args))
        except (ValueError, TypeError, ImportError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return {_key_for_message(message): message}
        except SystemExit as err:  # argparse-style exits must not end the portal
            return {"config": f"rejected by LLaMA-Factory's argument parser (exit {err.code})"}
    return {}


def validate_args(args: dict[str, Any], *, check_files: bool = True, run_parser: bool = True,
                  kind: str = "train") -> dict[str, str]:
    """Key -> problem; empty when the config would start training (``kind`` "export": start
    `llamafactory-cli export`, which reads no dataset)."""
    problems = type_problems(args)
    if problems:
        return problems  # the parser would only repeat these less clearly
    if check_files:
        problems.update(model_problems(args))
        if kind != "export":
            problems.update(dataset_problems(args))
        if problems:
            return problems
    if run_parser:
        problems.update(parser_problems(args, export=kind == "export"))
    return problems
