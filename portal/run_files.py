"""A run's files as the portal shows and serves them: its log, its output folder (artifacts) and
its checkpoints, read strictly inside the run's folder.

A job runs as the portal's own account and can write anything into its run folder, symlinks
included: a link named ``adapter_config.json`` pointing at another user's files, or ``output``
replaced by a link, must not turn a download into a way out. So every file is opened here:
relative paths only, no ``..``, no symlink anywhere on the way (the opened file's real path must
be the path asked for), regular files only. Ownership is checked before, by RunService.get_run.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

OUTPUT_DIR = "output"
MAX_ARTIFACTS = 1000  # entries listed; a folder with more says so
ARTIFACT_DOWNLOAD_MAX_BYTES = 10 * 1024 * 1024  # configs, logs and metrics: weights are fetched another way
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FileRefused(Exception):
    """The file is not there, or may not be read (outside the run, a link, not a file)."""


@dataclass
class Artifact:
    path: str  # relative to the run's output folder; a checkpoint folder ends with "/"
    size: int  # bytes (a checkpoint: all its files)
    modified: datetime
    files: int = 1  # a checkpoint: how many files it holds
    downloadable: bool = False  # a single file no larger than ARTIFACT_DOWNLOAD_MAX_BYTES


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def run_base(run_dir: str | os.PathLike, space_root: str | os.PathLike) -> Path:
    """The run's folder, resolved; refused unless it lies in its owner's space."""
    real = os.path.realpath(run_dir)
    if not run_dir or not _inside(real, os.path.realpath(space_root)) or not os.path.isdir(real):
        raise FileRefused("the run's folder is not there")
    return Path(real)


def _relative_parts(relative: str) -> tuple[str, ...]:
    text = str(relative or "").strip()
    if not text or "\x00" in text or "\\" in text or os.path.isabs(text):
        raise FileRefused(f"'{text}' is not a file of this run: give a path relative to its output folder")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if not parts or any(p == ".." for p in parts):
        raise FileRefused(f"'{text}' is not a file of this run: '..' is not allowed")
    return parts


def open_inside(base: Path, relative: str) -> tuple[BinaryIO, os.stat_result]:
    """``relative`` (a path under ``base``, the run's real folder) opened for reading. Refused:
    absolute paths, ``..``, a symlink anywhere on the way, anything but a regular file."""
    target = os.path.join(str(base), *_relative_parts(relative))
    if os.path.realpath(target) != target:  # a link on the way (or the file itself a link)
        raise FileRefused(f"'{relative}' is not a file of this run")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block
    except OSError as err:
        raise FileRefused(f"'{relative}' is not a file of this run") from err
    try:
        info = os.fstat(fd)
        opened = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else target
        if not stat.S_ISREG(info.st_mode) or opened != target:  # swapped for a link since the check
            raise FileRefused(f"'{relative}' is not a file of this run")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _folder_total(path: str) -> tuple[int, int, float]:
    """Size, file count and newest change of the regular files under ``path`` (links skipped)."""
    size = count = 0
    newest = 0.0
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                size, count, newest = size + info.st_size, count + 1, max(newest, info.st_mtime)
    return size, count, newest


def _sort_key(artifact: Artifact) -> tuple:
    match = CHECKPOINT.match(artifact.path.rstrip("/"))
    return (1, int(match.group(1)), "") if match else (0, 0, artifact.path)


def list_artifacts(base: Path) -> tuple[list[Artifact], bool]:
    """The files of the run's output folder (relative path, size, time); each ``checkpoint-N``
    folder as one entry. Symlinks are never listed. Returns the entries and whether the list was
    cut at MAX_ARTIFACTS."""
    output = os.path.join(str(base), OUTPUT_DIR)
    if os.path.islink(output) or not os.path.isdir(output):
        return [], False
    found: list[Artifact] = []
    cut = False
    for root, dirs, files in os.walk(output, followlinks=False):
        rel_root = os.path.relpath(root, output)
        prefix = "" if rel_root == "." else rel_root.replace(os.sep, "/") + "/"
        keep = []
        for name in sorted(dirs):
            full = os.path.join(root, name)
            if os.path.islink(full):
                continue
            if CHECKPOINT.match(name):
                size, count, newest = _folder_total(full)
                found.append(Artifact(f"{prefix}{name}/", size, _when(newest or os.lstat(full).st_mtime), count))
            else:
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):  # links, FIFOs, sockets: not the run's files
                continue
            found.append(Artifact(f"{prefix}{name}", info.st_size, _when(info.st_mtime),
                                  downloadable=info.st_size <= ARTIFACT_DOWNLOAD_MAX_BYTES))
        if len(found) >= MAX_ARTIFACTS:
            cut = True
            break
    found.sort(key=_sort_key)
    return found[:MAX_ARTIFACTS], cut


def last_checkpoint(base: Path) -> Path | None:
    """The run's newest ``output/checkpoint-N`` folder (a real folder, not a link, holding the
    trainer's state), or None."""
    output = os.path.join(str(base), OUTPUT_DIR)
    if os.path.islink(output) or not os.path.isdir(output):
        return None
    best: tuple[int, str] | None = None
    for name in os.listdir(output):
        match = CHECKPOINT.match(name)
        full = os.path.join(output, name)
        if not match or os.path.islink(full) or not os.path.isdir(full):
            continue
        state = os.path.join(full, "trainer_state.json")
        if os.path.islink(state) or not os.path.isfile(state):
            continue  # a checkpoint still being written (or broken) cannot be resumed from
        if best is None or int(match.group(1)) > best[0]:
            best = (int(match.group(1)), full)
    if best is None or os.path.realpath(best[1]) != best[1]:
        return None
    return Path(best[1])
