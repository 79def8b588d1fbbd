"""LLaMA Board's DeepSpeed presets (ds_z2/ds_z3, with and without offload), written where the
portal says instead of LLaMA Board's working-directory cache."""

from __future__ import annotations

import threading
from pathlib import Path
from unittest import mock

from llamafactory.webui import common as lf_common

_LOCK = threading.Lock()


def write_deepspeed_presets(target: Path) -> Path:
    target = Path(target)
    if (target / "ds_z3_offload_config.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with _LOCK, mock.patch.object(lf_common, "DEFAULT_CACHE_DIR", str(target)):
        lf_common.create_ds_config()
    return target
