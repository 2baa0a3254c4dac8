"""Transformer training (``var train``): what the VAR trainer (var_trainer.py) and the raster AR trainer
(ar_trainer.py) share.

One step (spec_var 4.1): the frozen tokenizer turns images into token maps; the transformer predicts every
token in one teacher-forced pass (block-causal over scales for VAR, causal for the raster AR, LlamaGen); the loss is the
token-averaged cross-entropy.  Label dropout for classifier-free guidance happens inside the model's forward
in training mode.  A new model's weights depend only on ``train.seed`` (drawn right after seeding, whatever
building the dataset and tokenizer consumed), so every process starts from the same weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

from var.checkpoints import save_model
from var.config import ExperimentConfig, TransformerModelConfig
from var.data.registry import build_dataset
from var.loading import load_one
from var.models.var import TransformerConfig
from var.sample.registry import build_sampler
from var.tokenizers.vqvae import VQVAE
from var.train.data import TokenizedDataset
from var.train.loop import Trainer
from var.train.losses import token_cross_entropy, weighted_mean
from var.train.optim import build_optimizer

GRID_CLASSES, GRID_PER_CLASS = 10, 8


class TransformerTrainer(Trainer):
    """Trains a transformer of ``kind`` on a frozen tokenizer; subclasses say what differs per model family.

    Args:
        experiment: config; uses ``data``, ``var`` (model, train, loss, recipe) and ``sample``.
        run_dir: run directory; every checkpoint is a bundle with ``vqvae.*`` and ``<kind>.*``.
        tokenizer: tokenizer run or bundle directory (default: ``var.tokenizer``, else the recipe's base or
            teacher bundle).
    """

    kind: ClassVar[str]  # the checkpoint name and the sampler: "var" or "ar"
    model_class: ClassVar[type]
    postfix_keys = ("loss", "acc", "lr", "images_per_s")

    def __init__(self, experiment: ExperimentConfig, run_dir: str | Path, tokenizer: str | Path | None = None,
                 resume: bool = False, progress: bool = True):
        super().__init__(experiment, experiment.var.train, run_dir, resume, progress)
        self.name = self.kind
        self.stage = experiment.var
        self.recipe_config = experiment.var.recipe
        self.loss_config = experiment.var.loss
        self.tokenizer_source = tokenizer or self.stage.tokenizer or self.recipe_config.base or \
            self.recipe_config.teacher
        if self.resume_from is not None:
            self.tokenizer_source = self.resume_from  # every checkpoint carries its tokenizer
        elif self.tokenizer_source is not None:
            self.stage.tokenizer = str(self.tokenizer_source)  # recorded in RUN/config.yaml
        self.build()

    # -- what a model family provides -------------------------------------------------------------------
    def check_config(self) -> None:
        """Raise a ValueError for settings this family cannot train (before anything is loaded)."""
        if not self.tokenizer_source:
            raise ValueError("no tokenizer given: pass --tokenizer RUN (a 'var train-tokenizer' run) or set "
                             "var.tokenizer=PATH")

    def adapt_tokenizer(self, tokenizer: VQVAE) -> VQVAE:
        """The tokenizer as this family reads it."""
        return tokenizer

    def new_model_config(self, architecture: TransformerConfig):
        """The model config of a new model: the stage's architecture plus what the tokenizer and data fix."""
        raise NotImplementedError

    def init_weights(self, model: torch.nn.Module, architecture: TransformerModelConfig) -> None:
        """Initialise a new model (VAR: the official rule with the stage's init_* settings)."""
        model.init_weights(init_adaln=architecture.init_adaln, init_adaln_gamma=architecture.init_adaln_gamma,
                           init_head=architecture.init_head, init_std=architecture.init_std)

    def setup_model(self, model: torch.nn.Module) -> None:
        """Family set-up once the model exists (recipes, per-token loss weights)."""

    def tokenize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images, or token rows of a pre-tokenized dataset -> (targets (B, L), the model's extra input)."""
        raise NotImplementedError

    def scales_and_weights(self) -> tuple[int | None, torch.Tensor]:
        """How many scales this step trains (None: the whole sequence) and the weight of every trained token."""
        raise NotImplementedError

    def logits(self, labels: torch.Tensor, targets: torch.Tensor, extra: torch.Tensor | None,
               num_scales: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the model's teacher-forced logits, a teacher's logits to distil or None)."""
        raise NotImplementedError

    def objective(self, ce: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor,
                  teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The loss to minimise (and extra metrics): the weighted token cross-entropy."""
        return weighted_mean(ce, weights), {}

    def tail_tokens(self, length: int) -> int:
        """Index of the first token whose accuracy is reported as ``acc_tail``."""
        return 0

    # -- shared ------------------------------------------------------------------------------------------
    def build(self) -> None:
        self.check_config()
        self.tokenizer = load_one(self.tokenizer_source, "vqvae", self.device).requires_grad_(False)
        self.dataset = build_dataset(self.experiment.data, "train")
        if self.experiment.data.image_size != self.tokenizer.config.image_size:
            raise ValueError(f"data.image_size={self.experiment.data.image_size} but the tokenizer encodes "
                             f"{self.tokenizer.config.image_size} px images; set data.image_size to match")
        self.num_classes = self.dataset.num_classes
        self.tokenizer = self.adapt_tokenizer(self.tokenizer)
        if self.stage.cache_tokens and not getattr(self.dataset, "augmented", True):
            self.dataset = TokenizedDataset(self.dataset, self.encode, self.device)
        model = self.build_model()
        self.setup_model(model)
        peak = self.default_peak_lr()
        self.add_optimizer(self.kind, build_optimizer(model, self.config.optim, peak), peak)
        if self.config.sample_every:
            self.sampler(model)  # bad sampler settings fail now, not at the first sample grid
        self.prepare(model)
        self.say(f"{self.kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                 f"{self.model_config.seq_len} tokens per image, recipe {self.recipe_config.name}")

    def build_model(self) -> torch.nn.Module:
        """The recipe's base model, or a new one drawn from ``train.seed`` alone."""
        if self.recipe_config.base:
            model = load_one(self.recipe_config.base, self.kind)
            self.say(f"starting from {self.recipe_config.base}")
        else:
            architecture: TransformerModelConfig = self.stage.model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                model = self.model_class(self.new_model_config(architecture))
                self.init_weights(model, architecture)
        if model.num_classes != self.num_classes:
            raise ValueError(f"the model has {model.num_classes} classes but the dataset has {self.num_classes}")
        model.check_tokenizer(self.tokenizer)
        self.model_config = model.config
        return model.to(self.device).train()

    @staticmethod
    def architecture(config: TransformerConfig) -> dict:
        """The shared block-architecture fields of a (training or model) config."""
        return {field.name: getattr(config, field.name) for field in dataclasses.fields(TransformerConfig)}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the concatenated token maps of all scales (B, L)."""
        return torch.cat(self.tokenizer.encode(images.float()), dim=1)

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        targets, extra = self.tokenize(inputs)
        num_scales, weights = self.scales_and_weights()
        logits, teacher_logits = self.logits(labels, targets, extra, num_scales)
        targets = targets[:, : logits.shape[1]]
        ce = token_cross_entropy(logits, targets, self.loss_config.label_smoothing)
        loss, metrics = self.objective(ce, weights, logits, teacher_logits)
        self.optimizer_step(loss, self.kind, self.model.parameters())
        with torch.no_grad():
            plain = token_cross_entropy(logits, targets) if self.loss_config.label_smoothing else ce
            correct = (logits.argmax(dim=-1) == targets).float()
            tail = self.tail_tokens(logits.shape[1])
            metrics.update(loss=loss, ce=plain.mean(), ce_tail=plain[:, tail:].mean(), acc=correct.mean(),
                           acc_tail=correct[:, tail:].mean())
        return metrics

    def save_models(self, directory: Path) -> None:
        save_model(self.tokenizer, directory, "vqvae")
        save_model(self.inference_model(), directory, self.kind, tokenizer=self.tokenizer)

    def extra_state(self) -> dict:
        return self.trained_weights_state()

    def load_models(self, directory: Path, state: dict) -> None:
        self.load_trained(directory, state, self.kind)

    def sampler(self, model: torch.nn.Module):
        """Plain sampling of this family with the config's ``sample`` settings."""
        return build_sampler(self.kind, model, self.tokenizer, self.experiment.sample)

    @torch.no_grad()
    def write_samples(self) -> None:
        """A grid of class-conditional samples, one row per class (labelled with it)."""
        model = self.inference_model()
        was_training = model.training
        model.eval()
        classes = torch.linspace(0, self.num_classes - 1, min(GRID_CLASSES, self.num_classes)).round().long()
        labels = classes.repeat_interleave(GRID_PER_CLASS).to(self.device)
        images = self.sampler(model).sample(labels, seed=0).images
        model.train(was_training)
        self.save_sample_grid(images, GRID_PER_CLASS, [f"class {int(c)}" for c in classes])
