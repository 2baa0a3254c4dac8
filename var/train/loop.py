"""The training loop every stage shares: accelerate, resumable data, schedules, logging, checkpoints.

A stage (tokenizer, VAR, raster AR) subclasses :class:`Trainer` and provides the models, one step of its
objective, and how its models are written into a checkpoint bundle; this module owns everything else.
Accelerate does device placement, mixed precision, gradient accumulation and DDP (``accelerate launch``).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import GradScalerKwargs, ProjectConfiguration, gather_object, is_tensorboard_available
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from var.checkpoints import strict_load
from var.config import ExperimentConfig, TrainConfig, save_config, to_dict
from var.train.data import resumable_loader
from var.train.optim import apply_schedules, peak_learning_rate
from var.train.runs import TRAINING_STATE, RunDirectory, capture_rng, restore_rng
from var.utils import seed_everything

MIXED_PRECISION = ("no", "bf16", "fp16")
# the official fp16 loss scaling (spec_var 4): start at 2^11, grow every 1000 clean steps, never above 2^15
FP16_INIT_SCALE = 2.0**11
FP16_GROWTH_INTERVAL = 1000
FP16_MAX_SCALE = 2.0**15


def cap_loss_scale(scaler: torch.amp.GradScaler | None, max_scale: float = FP16_MAX_SCALE) -> None:
    """Reset the fp16 loss scale to ``max_scale`` when it has grown past it (as the official trainer does).

    The clamp stays on the device: reading the scale (``get_scale``) would sync the host every step.
    """
    if scaler is not None and scaler.is_enabled():
        scaler.update(scaler._get_scale_async().clamp(max=max_scale))


def _flatten(data: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar} for tensorboard hyper-parameters."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _portable_rng(state: dict) -> dict:
    """RNG state with NumPy's array as a tensor, so the checkpoint loads with ``weights_only=True``."""
    name, keys, position, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(keys.copy()), position, has_gauss, gauss)}


def _native_rng(state: dict) -> dict:
    name, keys, position, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), position, has_gauss, gauss)}


class Trainer:
    """Shared machinery; subclasses implement :meth:`build`, :meth:`train_step` and :meth:`save_models`.

    Args:
        experiment: the whole experiment config (saved to RUN/config.yaml).
        train: the stage's :class:`TrainConfig`.
        run_dir: the run directory.
        resume: continue from RUN/checkpoints/latest (model, optimizer, scaler, RNG and data position).
        progress: show a tqdm bar.
    """

    name = "train"

    def __init__(self, experiment: ExperimentConfig, train: TrainConfig, run_dir: str | Path,
                 resume: bool = False, progress: bool = True):
        if train.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got '{train.mixed_precision}'")
        self.experiment = experiment
        self.config = train
        self.run = RunDirectory(run_dir)
        self.progress = progress
        log_with = None
        if is_tensorboard_available():
            log_with = "tensorboard"
        else:
            warnings.warn("tensorboard is not installed; training continues without logs (pip install tensorboard)",
                          stacklevel=2)
        # accelerate keeps its settings in a process-wide singleton; a later stage in the same process (var demo,
        # notebooks, tests) may use another precision, so each trainer starts from fresh settings (the
        # distributed set-up, PartialState, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.grad_accum,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.run.root), logging_dir=str(self.run.logs)),
            dynamo_backend="inductor" if train.compile else "no",
            kwargs_handlers=[GradScalerKwargs(init_scale=FP16_INIT_SCALE, growth_interval=FP16_GROWTH_INTERVAL)],
        )
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.resume_from = self._checkpoint_to_resume(resume)
        seed_everything(train.seed)  # same initial weights on every process
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.peak_lrs: dict[str, float] = {}
        self.ema: nn.Module | None = None
        self.dataset: Dataset | None = None
        self.model: nn.Module | None = None  # the main trained model (prepared)
        self.prepared: tuple[nn.Module, ...] = ()

    # ------------------------------------------------------------------------------------------------
    # what a stage provides
    def build(self) -> None:
        """Create ``self.dataset``, the models and ``self.optimizers``, then call :meth:`prepare`."""
        raise NotImplementedError

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward, and (through :meth:`optimizer_step`) the update."""
        raise NotImplementedError

    def save_models(self, directory: Path) -> None:
        """Write the bundle's model files (e.g. vqvae.* and var.*) into ``directory``."""
        raise NotImplementedError

    def load_models(self, directory: Path, state: dict) -> None:
        """Load the trained weights from a checkpoint written by :meth:`save_models` / :meth:`extra_state`."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Anything else a resumed run needs (e.g. raw weights when the bundle holds EMA weights)."""
        return {}

    def write_samples(self) -> None:
        """Write a sample grid PNG into RUN/samples (optional)."""

    def window_metrics(self) -> dict[str, float]:
        """Metrics gathered over a logging window besides the per-step averages (optional)."""
        return {}

    # ------------------------------------------------------------------------------------------------
    # set-up
    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        latest = self.run.latest() if self.run.checkpoints.is_dir() else None
        if latest is not None and not resume:
            raise ValueError(f"{self.run.root} already holds checkpoints (latest {latest.name}); pass --resume "
                             "to continue that run or choose another --out")
        if resume and latest is None:
            self.say(f"no checkpoint in {self.run.root} yet: starting a new run")
        return latest

    @property
    def effective_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.config.grad_accum

    @property
    def total_steps(self) -> int:
        if self.config.steps > 0:
            return self.config.steps
        if self.config.epochs <= 0:
            raise ValueError("set train.steps or train.epochs to a positive number")
        batches = len(self.dataset) // (self.config.batch_size * self.accelerator.num_processes)
        return max(1, math.ceil(self.config.epochs * batches / self.config.grad_accum))

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer, peak_lr: float) -> None:
        self.optimizers[name] = optimizer
        self.peak_lrs[name] = peak_lr

    def default_peak_lr(self) -> float:
        return peak_learning_rate(self.config.optim, self.effective_batch)

    def prepare(self, *models: nn.Module) -> None:
        """Hand models and optimizers to accelerate, load the checkpoint when resuming, start logging."""
        names = list(self.optimizers)
        prepared = self.accelerator.prepare(*models, *self.optimizers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.prepared = tuple(prepared[: len(models)])
        self.optimizers = dict(zip(names, prepared[len(models):], strict=True))
        self.model = self.prepared[0]
        if self.config.ema_decay > 0:
            self.ema = copy.deepcopy(self.unwrap(self.model)).eval().requires_grad_(False)
        if self.is_main:
            self.run.create()
            save_config(self.experiment, self.run.config)
        self.accelerator.wait_for_everyone()
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        else:
            seed_everything(self.config.seed + self.accelerator.process_index)  # per-process label dropout
        self.accelerator.init_trackers(self.name, config=_flatten(to_dict(self.experiment)))

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    # ------------------------------------------------------------------------------------------------
    # the step helpers
    def optimizer_step(self, loss: torch.Tensor, optimizer_name: str, parameters) -> torch.Tensor | None:
        """Backward (scaled for fp16 and accumulation); on the last micro-batch clip, step and zero grads.

        Returns the gradient norm before clipping on update micro-batches, else None.
        """
        self.accelerator.backward(loss)
        grad_norm = None
        if self.accelerator.sync_gradients and self.config.optim.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(parameters, self.config.optim.grad_clip)
        optimizer = self.optimizers[optimizer_name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            cap_loss_scale(self.accelerator.scaler)
        return grad_norm

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.config.ema_decay
        trained = self.unwrap(self.model).state_dict()
        for key, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(trained[key].to(value.dtype), 1 - decay)
            else:
                value.copy_(trained[key])

    def inference_model(self) -> nn.Module:
        """The weights to sample with: the EMA copy if kept, else the trained model."""
        return self.ema if self.ema is not None else self.unwrap(self.model)

    def trained_weights_state(self) -> dict:
        """With EMA the bundle holds the EMA weights, so the trained ones go into the training state."""
        return {"trained_weights": self.unwrap(self.model).state_dict()} if self.ema is not None else {}

    def load_trained(self, directory: Path, state: dict, name: str) -> None:
        """Load the main model (and EMA copy) saved by ``save_model(inference_model())`` + trained_weights_state."""
        path = directory / f"{name}.safetensors"
        bundle = load_file(str(path))
        if self.ema is not None:
            strict_load(self.ema, bundle, str(path))
            strict_load(self.unwrap(self.model), state["trained_weights"], f"{directory / TRAINING_STATE}")
        else:
            strict_load(self.unwrap(self.model), bundle, str(path))

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    def save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        rng_states = gather_object([_portable_rng(capture_rng())])  # one per process
        if self.is_main:
            temporary = self.run.begin_checkpoint(self.step)
            self.save_models(temporary)
            scaler = self.accelerator.scaler
            state = {
                "step": self.step,
                "num_processes": self.accelerator.num_processes,
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
                "metrics": self.last_metrics,
                **self.extra_state(),
            }
            torch.save(state, temporary / TRAINING_STATE)
            final = self.run.commit_checkpoint(temporary, self.step, self.config.keep_checkpoints)
            self.say(f"saved checkpoint {final}")
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, directory: Path) -> None:
        state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
        self.load_models(directory, state)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.last_metrics = dict(state.get("metrics") or {})
        rng = state["rng"]
        if len(rng) == self.accelerator.num_processes:
            restore_rng(_native_rng(rng[self.accelerator.process_index]))
        else:
            warnings.warn(f"the checkpoint was written by {len(rng)} processes, this run has "
                          f"{self.accelerator.num_processes}: random streams and data order differ from the "
                          "original run", stacklevel=2)
            seed_everything(self.config.seed + self.step + self.accelerator.process_index)
        self.say(f"resumed from {directory} at step {self.step}")

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to ``total_steps`` (from wherever a resumed run stopped); returns the last logged metrics."""
        total = self.total_steps
        if self.step >= total:
            self.say(f"{self.run.root}: already trained to step {self.step}")
            self.accelerator.end_training()
            return self.last_metrics
        accum = self.config.grad_accum
        loader = iter(resumable_loader(
            self.dataset, self.config.batch_size, self.config.seed, start=self.step * accum,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            num_workers=self.experiment.data.num_workers,
        ))
        bar = tqdm(total=total, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main), mininterval=1.0)
        window: dict[str, torch.Tensor | float] = defaultdict(float)
        window_steps, window_start = 0, time.perf_counter()
        while self.step < total:
            lrs = {name: apply_schedules(opt, self.step, total, self.config.optim, self.peak_lrs[name])
                   for name, opt in self.optimizers.items()}
            for _ in range(accum):
                images, labels = next(loader)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with self.accelerator.accumulate(*self.prepared):
                    metrics = self.train_step(images, labels)
                for key, value in metrics.items():
                    window[key] = window[key] + value.detach().float() / accum
            self.update_ema()
            self.step += 1
            window_steps += 1
            bar.update(1)
            if self.step % self.config.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                logged = {key: float(value) / window_steps for key, value in window.items()}
                logged["lr"] = next(iter(lrs.values()))
                logged["images_per_s"] = window_steps * self.effective_batch / max(elapsed, 1e-9)
                logged.update(self.window_metrics())
                self.accelerator.log(logged, step=self.step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k in self.postfix_keys})
                self.last_metrics = logged
                window, window_steps, window_start = defaultdict(float), 0, time.perf_counter()
            if self.is_main and self.config.sample_every and (
                self.step % self.config.sample_every == 0 or self.step == total
            ):
                self.write_samples()
            if self.step % self.config.checkpoint_every == 0 or self.step == total:
                self.save_checkpoint()
        bar.close()
        self.accelerator.end_training()
        return self.last_metrics

    postfix_keys = ("loss", "lr", "images_per_s")
