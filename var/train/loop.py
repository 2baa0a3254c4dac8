"""The training loop every stage shares: accelerate, resumable data, schedules, logging, checkpoints.

A stage (tokenizer, VAR, raster AR) subclasses :class:`Trainer` and provides the models, one step of its
objective, and how its models are written into a checkpoint bundle; this module owns everything else.
Accelerate does device placement, mixed precision, gradient accumulation and DDP (``accelerate launch``), and
saves the optimizers, the fp16 loss scaler and every process's RNG state into each checkpoint
(``save_state``/``load_state``).  Model weights are ours: the bundle's safetensors (unwrapped, so a
checkpoint resumes under any number of processes) plus, with EMA, the trained weights in the training state.
What accelerate does not give (atomic checkpoint directories, ``latest``, pruning, exact data position) lives
in var/train/runs.py and var/train/data.py.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    RNG_STATE_NAME,
    SCALER_NAME,
    GradScalerKwargs,
    ProjectConfiguration,
    is_tensorboard_available,
)
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from var.checkpoints import strict_load
from var.config import ExperimentConfig, TrainConfig, to_dict
from var.distributed import check_launch, quiet_other_processes
from var.train.data import resumable_loader
from var.train.optim import apply_schedules, peak_learning_rate
from var.train.runs import TRAINING_STATE, RunDirectory, file_sizes
from var.utils import save_grid, seed_everything

MIXED_PRECISION = ("no", "bf16", "fp16")
# the official fp16 loss scaling (spec_var 4): start at 2^11, grow every 1000 clean steps, never above 2^15
FP16_INIT_SCALE = 2.0**11
FP16_GROWTH_INTERVAL = 1000
FP16_MAX_SCALE = 2.0**15
# the command that continues a run of each stage (Trainer.name)
RESUME_COMMANDS = {"tokenizer": "var train-tokenizer", "var": "var train", "ar": "var train --model ar"}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says what was saved and how to continue (empty off the main process)."""


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


def exponential_moving_average(model: nn.Module, decay: float) -> ModelEmaV3:
    """timm's EMA of ``model`` (``.update(model)`` after each optimizer step, the average in ``.module``).

    Float tensors lerp towards the trained ones by ``1 - decay``, integer buffers are copied.  The weights are
    fp32 (autocast does the mixed precision), so no stochastic rounding: its private RNG would not be in the
    checkpoint and a resumed EMA would differ.
    """
    return ModelEmaV3(model, decay=decay, stochastic_rounding=False).requires_grad_(False)


def check_train_config(train: TrainConfig, section: str) -> None:
    """Reject settings that would give an empty or broken run, before anything is written.

    ``section`` names the config section in messages (``tokenizer.train`` or ``var.train``).
    """
    minimums = {"steps": 0, "batch_size": 1, "grad_accum": 1, "log_every": 1, "checkpoint_every": 1,
                "keep_checkpoints": 1, "sample_every": 0, "seed": 0}
    for name, minimum in minimums.items():
        value = getattr(train, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(train.epochs, bool) or not isinstance(train.epochs, (int, float)) or train.epochs < 0:
        raise ValueError(f"{section}.epochs must be a number >= 0, got {train.epochs!r}")
    if train.steps == 0 and train.epochs == 0:
        raise ValueError(f"set {section}.steps (optimizer steps) or {section}.epochs to a positive number")
    if not 0 <= train.ema_decay < 1:
        raise ValueError(f"{section}.ema_decay must be in [0, 1) (0 = no EMA), got {train.ema_decay!r}")
    if train.mixed_precision is not None and train.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"{section}.mixed_precision must be one of {', '.join(MIXED_PRECISION)} (or unset to "
                         f"take the launcher's), got '{train.mixed_precision}'")


def resolve_precision(configured: str | None, section: str) -> tuple[str, str]:
    """(precision, where it came from): the config's value when set, else ``accelerate launch --mixed_precision``."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if configured is not None:
        origin = f"{section}.mixed_precision"
        if launcher is not None and launcher != configured:
            origin += f", which overrides the launcher's {launcher}"
        return configured, origin
    if launcher is None:
        return "no", f"default; set {section}.mixed_precision or accelerate launch --mixed_precision"
    if launcher not in MIXED_PRECISION:
        raise ValueError(f"accelerate launch --mixed_precision {launcher} is not supported; use one of "
                         f"{', '.join(MIXED_PRECISION)}")
    return launcher, "accelerate launch --mixed_precision"


class Trainer:
    """Shared machinery; subclasses implement :meth:`build`, :meth:`train_step` and :meth:`save_models`.

    Args:
        experiment: the whole experiment config (saved to RUN/config.yaml).
        train: the stage's :class:`TrainConfig`.
        run_dir: the run directory.
        resume: continue the run in ``run_dir`` (which must exist) from its latest complete checkpoint (model,
            optimizer, scaler, every process's RNG and the data position).
        progress: show a tqdm bar.
    """

    name = "train"

    def __init__(self, experiment: ExperimentConfig, train: TrainConfig, run_dir: str | Path,
                 resume: bool = False, progress: bool = True):
        section = "tokenizer.train" if train is experiment.tokenizer.train else "var.train"
        check_train_config(train, section)
        self.section = section
        self.experiment = experiment
        self.config = train
        self.run = RunDirectory(run_dir)
        self.progress = progress
        if resume and not self.run.exists():
            raise FileNotFoundError(f"--resume: {self.run.root} is not a training run (no config.yaml or "
                                    "checkpoints there); check the path, or drop --resume to start a new run")
        self.precision, precision_origin = resolve_precision(train.mixed_precision, section)
        # accelerate keeps its settings in a process-wide singleton; a later stage in the same process (var demo,
        # notebooks, tests) may use another precision, so each trainer starts from fresh settings (the
        # distributed set-up, PartialState, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=self.precision,
            gradient_accumulation_steps=train.grad_accum,
            log_with="tensorboard" if is_tensorboard_available() else None,
            project_config=ProjectConfiguration(project_dir=str(self.run.root), logging_dir=str(self.run.logs)),
            dynamo_backend="inductor" if train.compile else "no",
            kwargs_handlers=[GradScalerKwargs(init_scale=FP16_INIT_SCALE, growth_interval=FP16_GROWTH_INTERVAL)],
        )
        check_launch(self.accelerator.num_processes)  # a mis-launched run stops here, before writing anything
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        quiet_other_processes(self.is_main)
        if not is_tensorboard_available():
            warnings.warn("tensorboard is not installed; training continues without logs (pip install tensorboard)",
                          stacklevel=2)
        # model weights are in the bundle (unwrapped): accelerate saves and loads everything else
        self.accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        self.accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
        self.say(f"{self.accelerator.num_processes} process(es) on {self.device}, mixed precision "
                 f"{self.precision} ({precision_origin})")
        self.resume_from, self.resume_state = self._checkpoint_to_resume(resume)
        seed_everything(train.seed)  # same initial weights on every process
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.peak_lrs: dict[str, float] = {}
        self.ema: ModelEmaV3 | None = None
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
        """Anything else a resumed run needs (e.g. raw weights when the bundle holds EMA weights).

        Called on every process (it may use collectives); the main process's result is saved.
        """
        return {}

    def write_samples(self) -> None:
        """Write a sample grid PNG into RUN/samples (optional)."""

    def save_sample_grid(self, images: torch.Tensor, nrow: int, row_labels: list[str]) -> None:
        """Write RUN/samples/step_<step>.png (rows labelled) and log the same grid to TensorBoard as ``samples``."""
        grid = save_grid(images, self.run.samples / f"step_{self.step:07d}.png", nrow=nrow, row_labels=row_labels)
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"samples": grid.unsqueeze(0)}, step=self.step)

    def window_metrics(self) -> dict[str, float]:
        """Metrics gathered over a logging window besides the per-step averages (optional)."""
        return {}

    # ------------------------------------------------------------------------------------------------
    # set-up
    def _checkpoint_to_resume(self, resume: bool) -> tuple[Path | None, dict | None]:
        """(checkpoint directory, its training state) to continue from, or (None, None) for a fresh start."""
        if not resume:
            if self.run.has_checkpoints():
                raise ValueError(f"{self.run.root} already holds checkpoints; pass --resume to continue that run "
                                 "or choose another --out")
            return None, None
        point = self.run.resume_point()
        if point is None:
            self.say(f"no checkpoint in {self.run.root} yet: starting the run from step 0")
            return None, None
        if point.skipped:
            self.say(f"{'; '.join(point.skipped)}: resuming from {point.directory.name}, the newest complete "
                     "checkpoint")
        return point.directory, point.state

    @property
    def effective_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.config.grad_accum

    @property
    def total_steps(self) -> int:
        if self.config.steps > 0:
            return self.config.steps
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
            self.ema = exponential_moving_average(self.unwrap(self.model), self.config.ema_decay)
        if self.is_main:
            self.run.create()
        self.accelerator.wait_for_everyone()
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from, self.resume_state)
        else:
            seed_everything(self.config.seed + self.accelerator.process_index)  # per-process label dropout
        if self.is_main:  # every setting has been checked and the checkpoint accepted them: only now is it saved
            self.run.save_config(self.experiment)
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

    def inference_model(self) -> nn.Module:
        """The weights to sample with: the EMA copy if kept, else the trained model."""
        return self.ema.module if self.ema is not None else self.unwrap(self.model)

    def trained_weights_state(self) -> dict:
        """With EMA the bundle holds the EMA weights, so the trained ones go into the training state."""
        return {"trained_weights": self.unwrap(self.model).state_dict()} if self.ema is not None else {}

    def load_trained(self, directory: Path, state: dict, name: str) -> None:
        """Load the main model (and EMA copy) saved by ``save_model(inference_model())`` + trained_weights_state."""
        path = directory / f"{name}.safetensors"
        bundle = load_file(str(path))
        if self.ema is not None:
            strict_load(self.ema.module, bundle, str(path))
            strict_load(self.unwrap(self.model), state["trained_weights"], f"{directory / TRAINING_STATE}")
        else:
            strict_load(self.unwrap(self.model), bundle, str(path))

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    def save_checkpoint(self) -> None:
        """Write the checkpoint of this step: every process adds its RNG state, the main process the rest."""
        extra = self.extra_state()
        temporary = self.run.temporary(self.step)
        if self.is_main:
            self.run.begin_checkpoint(self.step)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary))  # optimizers, fp16 scaler, random_states_<rank>.pkl
        self.accelerator.wait_for_everyone()
        if self.is_main:
            missing = [rank for rank in range(self.accelerator.num_processes)
                       if not (temporary / f"{RNG_STATE_NAME}_{rank}.pkl").is_file()]
            if missing:  # each process wrote its RNG state into its own view of the run directory
                warnings.warn(f"{temporary.name} lacks the RNG state of process(es) {missing}: put the run directory "
                              "on a filesystem every process shares, or a resume will not be exact", stacklevel=2)
            self.save_models(temporary)
            state = {
                "step": self.step,
                "num_processes": self.accelerator.num_processes,
                "effective_batch": self.effective_batch,
                "total_steps": self.total_steps,
                "peak_lrs": dict(self.peak_lrs),
                "mixed_precision": self.precision,
                "metrics": self.last_metrics,
                **extra,
                "files": file_sizes(temporary),  # resume checks these: a truncated or lost file is noticed
            }
            torch.save(state, temporary / TRAINING_STATE)
            final = self.run.commit_checkpoint(temporary, self.step, self.config.keep_checkpoints)
            self.say(f"saved checkpoint {final}")
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, directory: Path, state: dict) -> None:
        self.load_models(directory, state)
        scaler = self.accelerator.scaler
        if state["mixed_precision"] != self.precision:
            self.say(f"the checkpoint was trained with mixed precision {state['mixed_precision']}, this run uses "
                     f"{self.precision}")
        if scaler is not None and not (directory / SCALER_NAME).is_file():
            self.accelerator.scaler = None  # not trained in fp16 so far: the loss scale starts afresh
        try:
            self.accelerator.load_state(str(directory))
        finally:
            self.accelerator.scaler = scaler
        self.step = int(state["step"])
        self.last_metrics = dict(state.get("metrics") or {})
        if state["num_processes"] != self.accelerator.num_processes:
            warnings.warn(self._process_change(state), stacklevel=2)
            seed_everything(self.config.seed + self.step + self.accelerator.process_index)
        self.say(f"resumed from {directory} at step {self.step}")

    def _process_change(self, state: dict) -> str:
        """What resuming a checkpoint of another process count changes, in one sentence."""
        changes = [f"effective batch {state['effective_batch']} -> {self.effective_batch}"]
        for name, peak in state["peak_lrs"].items():
            now = self.peak_lrs.get(name, peak)
            changes.append(f"peak lr{'' if len(self.peak_lrs) == 1 else f' ({name})'} "
                           + (f"{peak:.4g} -> {now:.4g} (set {self.section}.optim.lr to keep it)" if now != peak
                              else f"{now:.4g} unchanged"))
        if state["total_steps"] != self.total_steps:
            changes.append(f"total steps {state['total_steps']} -> {self.total_steps} (same number of epochs)")
        return (f"the checkpoint was written by {state['num_processes']} process(es), this run has "
                f"{self.accelerator.num_processes}: {', '.join(changes)}; data order and random streams differ "
                "from the original run")

    def interrupted(self) -> TrainingInterrupted:
        """The Ctrl-C report: the step reached, the last checkpoint kept and the command that continues."""
        if not self.is_main:
            return TrainingInterrupted("")
        named = self.run.pointer()
        kept = (f"the last checkpoint is {self.run.checkpoints / named}" if named
                else "no checkpoint was saved yet")
        command = f"{RESUME_COMMANDS.get(self.name, 'var train')} --out {self.run.root} --resume"
        return TrainingInterrupted(f"interrupted at step {self.step} of {self.total_steps}; {kept}; continue "
                                   f"with: {command}")

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to ``total_steps`` (from wherever a resumed run stopped); returns the last logged metrics.

        Logged metrics are means over the logging window and over all processes.  Ctrl-C raises
        :class:`TrainingInterrupted` saying which checkpoint a ``--resume`` continues from.
        """
        total = self.total_steps
        if self.step >= total:
            self.say(f"{self.run.root}: already trained to step {self.step}")
            self.accelerator.end_training()
            return self.last_metrics
        bar = tqdm(total=total, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main), mininterval=1.0)
        try:
            self._train_to(total, bar)
        except KeyboardInterrupt:
            raise self.interrupted() from None
        finally:
            bar.close()
        self.accelerator.end_training()
        return self.last_metrics

    def _train_to(self, total: int, bar: tqdm) -> None:
        accum = self.config.grad_accum
        loader = iter(resumable_loader(
            self.dataset, self.config.batch_size, self.config.seed, start=self.step * accum,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            num_workers=self.experiment.data.num_workers,
        ))
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
            if self.ema is not None:
                self.ema.update(self.unwrap(self.model))
            self.step += 1
            window_steps += 1
            bar.update(1)
            if self.step % self.config.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                means = self.accelerator.reduce(torch.stack(list(window.values())), reduction="mean")  # over ranks
                logged = {key: value / window_steps for key, value in zip(window, means.tolist(), strict=True)}
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

    postfix_keys = ("loss", "lr", "images_per_s")
