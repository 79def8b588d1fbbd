"""Where a user's files live, and the one check every user-given path goes through."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class PathNotAllowed(PermissionError):
    pass


def check_name(value: str, what: str) -> str:
    """Names of runs, saved forms, users: letters, digits, '.', '_', '-'; no path parts."""
    value = (value or "").strip()
    if not NAME_PATTERN.match(value) or value in (".", "..") or ".." in value:
        raise ValueError(
            f"{what} '{value}' is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def resolve_inside(path: str | os.PathLike, roots: list[Path], what: str) -> Path:
    """``path`` resolved (symlinks followed); refused unless it lies inside one of ``roots``."""
    raw = str(path)
    if not os.path.isabs(raw):
        raise PathNotAllowed(f"{what} '{raw}' must be an absolute path inside your space or a shared folder")
    if any(part == ".." for part in Path(raw).parts):
        raise PathNotAllowed(f"{what} '{raw}' contains '..': give the folder's full path without '..'")
    real = Path(os.path.realpath(raw))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            return real
    allowed = ", ".join(str(r) for r in roots)
    raise PathNotAllowed(f"{what} '{raw}' is outside the folders you may use ({allowed})")


@dataclass(frozen=True)
class UserSpace:
    """One user's folder under the data root: their runs, datasets and saved forms."""

    root: Path

    @classmethod
    def for_user(cls, users_root: Path, username: str) -> "UserSpace":
        return cls(Path(users_root) / check_name(username, "user name"))

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def forms_dir(self) -> Path:
        return self.root / "forms"

    @property
    def models_dir(self) -> Path:
        """Merged models (export runs write ``models/<run name>``): made by the first merge."""
        return self.root / "models"

    def run_dir(self, run_name: str) -> Path:
        return self.runs_dir / check_name(run_name, "run name")

    def ensure(self) -> "UserSpace":
        for path in (self.runs_dir, self.datasets_dir, self.forms_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self
