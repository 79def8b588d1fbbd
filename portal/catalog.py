"""What a user may train on: catalog models and datasets (shared, read-only) plus their own."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import CatalogModel, Settings
from .storage import PathNotAllowed, UserSpace, resolve_inside

DATASET_INFO = "dataset_info.json"
SHARED_MARK = "portal_shared"  # marks entries the portal copied in from the shared catalog


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read: {err}") from err
    return data if isinstance(data, dict) else {}


class CatalogError(ValueError):
    """The admin's model catalog (``models:`` in the settings) has an entry the portal cannot use."""


class Catalog:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.check_models()

    # ---- models --------------------------------------------------------------------------
    def check_models(self) -> None:
        """Checks what Settings cannot (it does not import LLaMA-Factory): every template is known."""
        from llamaboard_ext.templates import known_templates

        templates = known_templates()
        for entry in self.settings.models:
            if entry.template is not None and entry.template not in templates:
                close = sorted(t for t in templates if t.startswith(entry.template[:3]))[:8]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise CatalogError(f"models entry '{entry.name}': template '{entry.template}' is not a "
                                   f"LLaMA-Factory template{hint}")

    def _discovered(self) -> dict[str, str]:
        root = self.settings.shared_models_root
        found: dict[str, str] = {}
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if (child / "config.json").is_file():
                    found[child.name] = str(child)
        return found

    def models(self) -> dict[str, str]:
        """Model name -> folder or hub id, for the form: the configured entries first, then every
        model folder under the shared models root that no entry names (under its folder name)."""
        found = {entry.name: entry.source for entry in self.settings.models}
        configured = {os.path.realpath(e.path) for e in self.settings.models if e.path is not None}
        for name, folder in self._discovered().items():
            if name not in found and os.path.realpath(folder) not in configured:
                found[name] = folder
        return found

    def model_entry(self, name_or_path: str | os.PathLike | None) -> CatalogModel | None:
        """The configured entry with this name, folder (compared resolved) or hub id; None when none.
        Folders found under the shared models root without an entry have none."""
        if not name_or_path:
            return None
        value = str(name_or_path).strip()
        for entry in self.settings.models:
            if value in (entry.name, entry.hub_id):
                return entry
        if os.path.isabs(value):
            real = os.path.realpath(value)
            for entry in self.settings.models:
                if entry.path is not None and os.path.realpath(entry.path) == real:
                    return entry
        return None

    # ---- datasets ------------------------------------------------------------------------
    def shared_datasets(self) -> dict[str, Any]:
        return _read_json(self.settings.shared_datasets_root / DATASET_INFO)

    def own_datasets(self, space: UserSpace) -> dict[str, Any]:
        info = _read_json(space.datasets_dir / DATASET_INFO)
        return {name: entry for name, entry in info.items() if isinstance(entry, dict) and not entry.get(SHARED_MARK)}

    def sync_user_datasets(self, space: UserSpace) -> dict[str, Any]:
        """Write the user's dataset_info.json: their own entries plus the shared ones (absolute,
        read-only). That folder is the ``dataset_dir`` of every run of theirs."""
        space.ensure()
        merged = dict(self.own_datasets(space))
        for name, entry in self.shared_datasets().items():
            if name in merged or not isinstance(entry, dict):
                continue  # the user's own dataset of the same name wins
            entry = dict(entry)
            if entry.get("file_name") and not os.path.isabs(entry["file_name"]):
                entry["file_name"] = str(self.settings.shared_datasets_root / entry["file_name"])
            entry[SHARED_MARK] = True
            merged[name] = entry
        target = space.datasets_dir / DATASET_INFO
        text = json.dumps(merged, indent=2, sort_keys=True)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        return merged

    def dataset_names(self, space: UserSpace, ranking: bool | None = None) -> list[str]:
        info = self.sync_user_datasets(space)
        return sorted(n for n, e in info.items() if ranking is None or bool(e.get("ranking", False)) == ranking)

    def dataset_file(self, space: UserSpace, name: str) -> Path:
        """The data file of a dataset the user may read; refused when it points elsewhere."""
        info = self.sync_user_datasets(space)
        entry = info.get(name)
        if entry is None:
            raise ValueError(f"unknown dataset '{name}'")
        file_name = entry.get("file_name")
        if not file_name:
            raise ValueError(f"dataset '{name}' has no local file to preview")
        path = file_name if os.path.isabs(file_name) else str(space.datasets_dir / file_name)
        return resolve_inside(path, self.readable_roots(space), f"dataset '{name}' file")

    def readable_roots(self, space: UserSpace) -> list[Path]:
        return [space.root, self.settings.shared_root]

    def check_dataset_files(self, space: UserSpace, names: list[str]) -> dict[str, str]:
        problems: dict[str, str] = {}
        for name in names:
            try:
                self.dataset_file(space, name)
            except PathNotAllowed as err:
                problems["dataset"] = str(err)
            except ValueError:
                pass  # unknown names and hub datasets are reported by validation
        return problems
