"""Run directories and crash-safe checkpoints.

Layout (read by ``var sample --ckpt RUN`` through var/loading.py)::

    RUN/config.yaml                     the resolved experiment config
    RUN/checkpoints/step_0000500/       a self-contained bundle: vqvae.*, var.* (or ar.*), training_state.pt
    RUN/checkpoints/latest              text file naming the newest complete step directory
    RUN/samples/*.png                   periodic sample grids
    RUN/logs/                           tensorboard

A checkpoint is written into a hidden temporary directory, renamed into place when complete, and only then
named by ``latest`` (itself replaced atomically).  A process killed at any moment therefore leaves either
the previous checkpoint or the new one as ``latest``, never a partial one; leftovers are removed on the next
start.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from var.loading import LATEST_POINTER
from var.utils import atomic_write

STEP_PREFIX = "step_"
TEMP_PREFIX = ".tmp-"
TRAINING_STATE = "training_state.pt"


class RunDirectory:
    """Paths of a run and the checkpoint protocol (temporary dir -> rename -> ``latest`` -> prune)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.logs = self.root / "logs"
        self.config = self.root / "config.yaml"

    def create(self) -> None:
        for folder in (self.checkpoints, self.samples, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.remove_partial()

    def remove_partial(self) -> None:
        """Delete temporary directories left by a process killed while saving."""
        if self.checkpoints.is_dir():
            for entry in self.checkpoints.glob(f"{TEMP_PREFIX}*"):
                shutil.rmtree(entry, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        pointer = self.checkpoints / LATEST_POINTER
        if not pointer.is_file():
            return None
        directory = self.checkpoints / pointer.read_text().strip()
        if not (directory / TRAINING_STATE).is_file():
            raise FileNotFoundError(f"{pointer} names {directory}, which is not a complete checkpoint")
        return directory

    def begin_checkpoint(self, step: int) -> Path:
        """A fresh temporary directory to write the checkpoint of ``step`` into."""
        temporary = self.checkpoints / f"{TEMP_PREFIX}{STEP_PREFIX}{step:07d}-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        return temporary

    def commit_checkpoint(self, temporary: Path, step: int, keep: int) -> Path:
        """Rename a finished temporary directory into place, point ``latest`` at it, drop old ones."""
        final = self.checkpoints / f"{STEP_PREFIX}{step:07d}"
        if final.exists():  # left by a run killed after this rename but before ``latest`` moved on
            shutil.rmtree(final)
        _fsync_tree(temporary)
        os.replace(temporary, final)
        atomic_write(self.checkpoints / LATEST_POINTER, lambda tmp: Path(tmp).write_text(final.name + "\n"))
        self.prune(keep, protect=final)
        return final

    def prune(self, keep: int, protect: Path) -> None:
        steps = sorted(p for p in self.checkpoints.glob(f"{STEP_PREFIX}*") if p.is_dir())
        for old in steps[: max(0, len(steps) - keep)]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a checkpoint to disk before it becomes visible under its final name."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def capture_rng() -> dict:
    """Every random generator a training step may draw from (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
