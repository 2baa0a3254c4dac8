"""Run directories and crash-safe checkpoints.

Layout (read by ``var sample --ckpt RUN`` through var/loading.py)::

    RUN/config.yaml                     the resolved experiment config
    RUN/checkpoints/step_0000500/       a self-contained bundle: vqvae.*, var.* (or ar.*) safetensors + JSON,
                                        accelerate's optimizer*.bin, scaler.pt (fp16) and random_states_<rank>.pkl,
                                        and training_state.pt (step, metrics, sizes of the other files)
    RUN/checkpoints/latest              text file naming the newest complete step directory
    RUN/samples/*.png                   periodic sample grids
    RUN/logs/                           tensorboard

A checkpoint is written into a hidden temporary directory (every process adds its own files), flushed to disk,
renamed into place when complete, and only then named by ``latest`` (itself replaced atomically).  A process
killed at any moment therefore leaves either the previous checkpoint or the new one as ``latest``, never a
partial one; leftovers are removed on the next start.  A checkpoint damaged later (a truncated or missing file,
caught by the sizes recorded in its training state) is skipped on resume for the newest complete one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from var.config import save_config
from var.loading import LATEST_POINTER
from var.utils import atomic_write_text

STEP_PREFIX = "step_"
TEMP_PREFIX = ".tmp-"
TRAINING_STATE = "training_state.pt"


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, its loaded training state, and why newer ones were skipped."""

    directory: Path
    state: dict
    skipped: list[str]


def _step_of(directory: Path) -> int | None:
    try:
        return int(directory.name.removeprefix(STEP_PREFIX))
    except ValueError:
        return None


def file_sizes(directory: Path) -> dict[str, int]:
    """Name -> size of every file in a checkpoint directory (recorded in its training state)."""
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir()) if path.is_file()}


def read_checkpoint(directory: Path) -> tuple[dict | None, str | None]:
    """(training state, None) for a complete checkpoint directory, else (None, what is wrong with it)."""
    if not directory.is_dir():
        return None, "does not exist"
    path = directory / TRAINING_STATE
    if not path.is_file():
        return None, f"has no {TRAINING_STATE}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncation, a foreign pickle, bad zip: all mean "damaged" here
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0][:120]
        return None, f"has an unreadable {TRAINING_STATE} ({reason})"
    if not isinstance(state, dict) or "files" not in state:
        return None, "was written by an older version of var (no accelerate state); its bundle still samples"
    for name, size in state["files"].items():
        file = directory / name
        if not file.is_file():
            return None, f"is missing {name}"
        if file.stat().st_size != size:
            return None, f"has a damaged {name} ({file.stat().st_size} bytes, {size} when written)"
    return state, None


class RunDirectory:
    """Paths of a run and the checkpoint protocol (temporary dir -> rename -> ``latest`` -> prune)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.logs = self.root / "logs"
        self.config = self.root / "config.yaml"

    def exists(self) -> bool:
        """Whether this is a run started earlier (it has a config or checkpoints)."""
        return self.config.is_file() or self.checkpoints.is_dir()

    def create(self) -> None:
        for folder in (self.checkpoints, self.samples, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.remove_partial()

    def save_config(self, experiment) -> None:
        """Write RUN/config.yaml atomically (a kill never leaves a half-written config behind)."""
        save_config(experiment, self.config)

    def remove_partial(self) -> None:
        """Delete temporary directories left by a process killed while saving."""
        if self.checkpoints.is_dir():
            for entry in self.checkpoints.glob(f"{TEMP_PREFIX}*"):
                shutil.rmtree(entry, ignore_errors=True)

    def step_directories(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        if not self.checkpoints.is_dir():
            return []
        steps = [p for p in self.checkpoints.glob(f"{STEP_PREFIX}*") if p.is_dir() and _step_of(p) is not None]
        return sorted(steps, key=_step_of, reverse=True)

    def pointer(self) -> str | None:
        """The directory name ``latest`` holds, if any."""
        pointer = self.checkpoints / LATEST_POINTER
        return pointer.read_text().strip() if pointer.is_file() else None

    def has_checkpoints(self) -> bool:
        return self.pointer() is not None or bool(self.step_directories())

    def resume_point(self) -> ResumePoint | None:
        """The checkpoint to continue from: the one ``latest`` names or, when that one is damaged or gone, the
        newest complete one before it; None for a run without checkpoints.

        Raises FileNotFoundError when the run has checkpoints but none of them is complete.
        """
        named = self.pointer()
        candidates = self.step_directories()
        if named is not None:
            named_step = _step_of(Path(named))
            older = [p for p in candidates if named_step is None or _step_of(p) < named_step]
            candidates = [self.checkpoints / named, *older]
        if not candidates:
            return None
        skipped = []
        for candidate in candidates:
            state, problem = read_checkpoint(candidate)
            if state is not None:
                return ResumePoint(candidate, state, skipped)
            skipped.append(f"{candidate.name} {problem}" + (f" (named by checkpoints/{LATEST_POINTER})"
                                                            if candidate.name == named else ""))
        raise FileNotFoundError(f"no complete checkpoint in {self.checkpoints}: {'; '.join(skipped)}; "
                                "start a new run with another --out")

    def temporary(self, step: int) -> Path:
        """Where every process writes its part of the checkpoint of ``step`` (the same path on all of them)."""
        return self.checkpoints / f"{TEMP_PREFIX}{STEP_PREFIX}{step:07d}"

    def begin_checkpoint(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step`` (main process, before the others write)."""
        temporary = self.temporary(step)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        return temporary

    def commit_checkpoint(self, temporary: Path, step: int, keep: int) -> Path:
        """Flush a finished temporary directory, rename it into place, point ``latest`` at it, drop old ones."""
        final = self.checkpoints / f"{STEP_PREFIX}{step:07d}"
        if final.exists():  # left by a run killed after this rename but before ``latest`` moved on
            shutil.rmtree(final)
        _fsync_tree(temporary)
        os.replace(temporary, final)
        atomic_write_text(self.checkpoints / LATEST_POINTER, final.name + "\n")
        self.prune(keep, protect=final)
        return final

    def prune(self, keep: int, protect: Path) -> None:
        for old in self.step_directories()[keep:]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a checkpoint (and the directory entries) to disk before it gets its final name."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
