"""Transformer training (``var train``): VAR next-scale prediction, the raster AR baseline, CoDe recipes.

One step (spec_var 4.1): the frozen tokenizer turns images into per-scale token maps; the transformer sees
the teacher-forcing inputs (area-downsampled running f_hat) and predicts every token of every scale in one
block-causal pass; the loss is the token-averaged cross-entropy.  Label dropout for classifier-free
guidance happens inside ``VAR.forward`` in training mode.

Variants (all options of the same trainer):

* per-scale loss weights and progressive coarse-to-fine training (``var.loss``);
* ``--model ar``: a raster-order :class:`RasterAR` over the tokenizer's latent quantised as one scale
  (``patch_nums=(latent_side,)``); its bundle stores the tokenizer with that single-scale schedule;
* ``recipe.name=code-drafter``: fine-tune a base VAR with cross-entropy on its scales < draft_steps only;
* ``recipe.name=code-refiner``: distil a frozen teacher VAR's logits into a (possibly smaller) student.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from var.checkpoints import check_pair, save_model
from var.data.registry import build_dataset
from var.models.ar import ARConfig, RasterAR
from var.models.var import VAR, VARConfig
from var.pipeline import load_one
from var.sample.ar import ARSampler
from var.sample.base import VARSampler
from var.sample.code import check_refiner
from var.tokenizers.vqvae import VQVAE
from var.train.config import ExperimentConfig, TransformerConfig, TransformerLossConfig
from var.train.data import TokenizedDataset
from var.train.loop import Trainer
from var.train.losses import distillation_kl, scale_token_weights, token_cross_entropy, weighted_mean
from var.train.optim import build_optimizer, warmup_steps
from var.utils import save_grid

RECIPES = ("standard", "code-drafter", "code-refiner")
MODEL_KINDS = ("var", "ar")
GRID_CLASSES, GRID_PER_CLASS = 10, 8
_ARCH_KEYS = ("depth", "width", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate",
              "cond_drop_rate", "attn_l2_norm")


def progressive_stage(step: int, total_steps: int, warmup: int, loss: TransformerLossConfig, num_scales: int
                      ) -> tuple[int, float]:
    """Progressive training (spec_var 4.4): (index of the newest trained scale, its loss weight).

    The newest scale grows from ``progressive_start_scale`` (during warm-up) to the last one, reached at
    ``progressive`` x the run; each newly added scale's loss ramps in from 0.01 to 1 over
    ``progressive_ramp_steps`` (the first stage is not ramped).  Without progressive training: (last, 1).
    """
    last = num_scales - 1
    if loss.progressive <= 0:
        return last, 1.0
    first = min(loss.progressive_start_scale, last)
    end = loss.progressive * total_steps

    def stage_at(s: int) -> int:
        if s < warmup:
            return first
        if s >= end:
            return last
        return first + round((s - warmup) / max(1.0, end - warmup) * (last - first))

    stage = stage_at(step)
    if stage == first:
        return stage, 1.0
    began = bisect.bisect_left(range(step + 1), stage, key=stage_at)  # stage_at is non-decreasing
    ramp = loss.progressive_ramp_steps or max(1, round(total_steps / 300))
    return stage, min(1.0, max(0.01, (step - began) / ramp))


@contextlib.contextmanager
def labels_as_given(model: torch.nn.Module):
    """Suspend a model's internal label dropout (the caller has already dropped labels itself)."""
    rate = model.config.cond_drop_rate
    model.config.cond_drop_rate = 0.0
    try:
        yield
    finally:
        model.config.cond_drop_rate = rate


class TransformerTrainer(Trainer):
    """Trains a VAR (or, with ``model_kind="ar"``, a RasterAR) on a frozen tokenizer.

    Args:
        experiment: config; uses ``data``, ``var`` (model, train, loss, recipe) and ``sample``.
        run_dir: run directory; every checkpoint is a bundle with ``vqvae.*`` and ``var.*`` / ``ar.*``.
        tokenizer: tokenizer run or bundle directory (default: ``var.tokenizer``, else the recipe's base or
            teacher bundle).
        model_kind: "var" or "ar".
    """

    postfix_keys = ("loss", "acc", "lr", "images_per_s")

    def __init__(self, experiment: ExperimentConfig, run_dir: str | Path, tokenizer: str | Path | None = None,
                 model_kind: str = "var", resume: bool = False, progress: bool = True):
        if model_kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind '{model_kind}'; choose var or ar")
        super().__init__(experiment, experiment.var.train, run_dir, resume, progress)
        self.name = model_kind
        self.kind = model_kind
        self.stage = experiment.var
        self.recipe = experiment.var.recipe
        self.loss_config = experiment.var.loss
        self.tokenizer_source = tokenizer or self.stage.tokenizer or self.recipe.base or self.recipe.teacher
        if self.resume_from is not None:
            self.tokenizer_source = self.resume_from  # every checkpoint carries its tokenizer
        elif self.tokenizer_source is not None:
            self.stage.tokenizer = str(self.tokenizer_source)  # recorded in RUN/config.yaml
        self.build()

    # ------------------------------------------------------------------------------------------------
    def build(self) -> None:
        self.check_recipe()
        self.tokenizer = self.load_tokenizer()
        self.dataset = build_dataset(self.experiment.data, "train")
        if self.experiment.data.image_size != self.tokenizer.config.image_size:
            raise ValueError(f"data.image_size={self.experiment.data.image_size} but the tokenizer encodes "
                             f"{self.tokenizer.config.image_size} px images; set data.image_size to match")
        self.num_classes = self.dataset.num_classes
        if self.kind == "ar":
            self.tokenizer = self.single_scale_view(self.tokenizer)
        if self.stage.cache_tokens and not getattr(self.dataset, "augmented", True):
            self.dataset = TokenizedDataset(self.dataset, self.encode, self.device)
        model = self.build_model()
        self.teacher = self.load_teacher(model) if self.recipe.name == "code-refiner" else None
        self.token_weights = self.base_token_weights(model)
        peak = self.default_peak_lr()
        if self.loss_config.progressive > 0 and self.config.optim.schedule == "lin0":
            self.config.optim.schedule = f"lin{self.loss_config.progressive:g}"  # as the official trainer does
            self.say(f"progressive training: lr schedule {self.config.optim.schedule}")
        self.add_optimizer(self.kind, build_optimizer(model, self.config.optim, peak), peak)
        if self.config.sample_every:
            self.sampler(model)  # bad sampler settings fail now, not at the first sample grid
        self.prepare(model)
        self.say(f"{self.kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                 f"{self.model_config.seq_len} tokens per image, recipe {self.recipe.name}")

    def check_recipe(self) -> None:
        recipe, loss = self.recipe, self.loss_config
        if recipe.name not in RECIPES:
            raise ValueError(f"unknown recipe '{recipe.name}'; choose one of {', '.join(RECIPES)}")
        if self.kind == "ar" and (recipe.name != "standard" or loss.progressive > 0 or loss.scale_weights):
            raise ValueError("--model ar trains one raster sequence: CoDe recipes, progressive training and "
                             "scale_weights apply to VAR only")
        if recipe.name == "code-drafter" and not recipe.base:
            raise ValueError("recipe code-drafter fine-tunes a base VAR: set var.recipe.base=RUN_OR_BUNDLE")
        if recipe.name == "code-refiner" and not recipe.teacher:
            raise ValueError("recipe code-refiner distils a teacher VAR: set var.recipe.teacher=RUN_OR_BUNDLE")
        if not self.tokenizer_source:
            raise ValueError("no tokenizer given: pass --tokenizer RUN (a 'var train-tokenizer' run) or set "
                             "var.tokenizer=PATH")

    def load_tokenizer(self) -> VQVAE:
        """From a run / bundle directory, or an official ``vae_ch160v4096z32.pth`` file."""
        return load_one(self.tokenizer_source, "vqvae", self.device).requires_grad_(False)

    @torch.no_grad()
    def single_scale_view(self, tokenizer: VQVAE) -> VQVAE:
        """The tokenizer quantising the whole latent as one raster token map (patch_nums=(side,)), for AR.

        A multi-scale tokenizer's codes and decoder are trained for residual sums over scales, so read as one
        scale it usually reconstructs much worse than a tokenizer trained with one scale; measure and warn.
        """
        single = copy.deepcopy(tokenizer)
        single.set_patch_nums((tokenizer.patch_nums[-1],))
        if len(tokenizer.patch_nums) > 1:
            count = min(256, len(self.dataset))
            images = torch.stack([self.dataset[i][0] for i in range(count)]).to(self.device)
            multi_error, single_error = (F.l1_loss(model.decode(model.encode(images)), images).item()
                                         for model in (tokenizer, single))
            if single_error > 1.5 * multi_error:
                warnings.warn(
                    f"this {len(tokenizer.patch_nums)}-scale tokenizer reconstructs worse as one scale (L1 "
                    f"{single_error:.3f} vs {multi_error:.3f} multi-scale); for a stronger AR baseline train a "
                    "single-scale tokenizer: var train-tokenizer ... "
                    f"tokenizer.model.patch_nums=[{single.patch_nums[0]}]",
                    stacklevel=2,
                )
        return single

    def new_model_config(self, arch: TransformerConfig) -> VARConfig | ARConfig:
        shared = {key: getattr(arch, key) for key in _ARCH_KEYS}
        tokenizer = self.tokenizer.config
        if self.kind == "ar":
            return ARConfig(**shared, vocab_size=tokenizer.vocab_size, num_classes=self.num_classes,
                            side=tokenizer.patch_nums[-1])
        return VARConfig(**shared, shared_aln=arch.shared_aln, vocab_size=tokenizer.vocab_size,
                         z_channels=tokenizer.z_channels, num_classes=self.num_classes,
                         patch_nums=tokenizer.patch_nums)

    def build_model(self) -> VAR | RasterAR:
        if self.recipe.base:
            model = load_one(self.recipe.base, self.kind)
            self.say(f"starting from {self.recipe.base}")
        else:
            arch = self.stage.model
            config = self.new_model_config(arch)
            model = (RasterAR if self.kind == "ar" else VAR)(config)
            model.init_weights(init_adaln=arch.init_adaln, init_adaln_gamma=arch.init_adaln_gamma,
                               init_head=arch.init_head, init_std=arch.init_std)
        if model.num_classes != self.num_classes:
            raise ValueError(f"the model has {model.num_classes} classes but the dataset has {self.num_classes}")
        if self.kind == "var":
            check_pair(self.tokenizer, model)
        elif model.config.vocab_size != self.tokenizer.config.vocab_size:
            raise ValueError(f"AR vocabulary {model.config.vocab_size} differs from the tokenizer's "
                             f"{self.tokenizer.config.vocab_size}")
        self.model_config = model.config
        return model.to(self.device).train()

    def load_teacher(self, student: VAR) -> VAR:
        teacher = load_one(self.recipe.teacher, "var", self.device).requires_grad_(False)
        check_refiner(teacher, student)  # the student refines what the teacher would: same token space
        return teacher

    def base_token_weights(self, model: VAR | RasterAR) -> torch.Tensor:
        if self.kind == "ar":
            return torch.ones(model.config.seq_len, device=self.device)
        config = model.config
        num_scales = config.num_scales
        draft_steps = self.recipe.draft_steps
        if self.recipe.name != "standard" and not 1 <= draft_steps < num_scales:
            raise ValueError(f"var.recipe.draft_steps must be in 1..{num_scales - 1} for {num_scales} scales, "
                             f"got {draft_steps}")
        weights = self.loss_config.scale_weights or [1.0] * num_scales
        return scale_token_weights(config.tokens_per_scale, weights, self.device)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the concatenated token maps of all scales (B, L)."""
        return torch.cat(self.tokenizer.encode(images.float()), dim=1)

    @torch.no_grad()
    def tokenize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images, or token rows of a pre-tokenized dataset -> (targets (B, L), teacher-forcing features
        (B, L - 1, Cvae) for VAR, None for AR)."""
        targets = inputs if inputs.dtype == torch.long else self.encode(inputs)
        if self.kind == "ar":
            return targets, None
        indices = targets.split([pn * pn for pn in self.tokenizer.patch_nums], dim=1)
        return targets, self.tokenizer.quantize.teacher_forcing_input(indices)

    def scales_and_weights(self) -> tuple[int | None, torch.Tensor]:
        """How many scales this step trains and the loss weight of every trained token."""
        config, weights = self.model_config, self.token_weights
        if self.kind == "ar":
            return None, weights
        bounds = config.scale_bounds
        if self.recipe.name == "code-drafter":
            num_scales = self.recipe.draft_steps
            return num_scales, weights[: bounds[num_scales - 1][1]]
        newest, newest_weight = progressive_stage(self.step, self.total_steps,
                                                  warmup_steps(self.config.optim, self.total_steps),
                                                  self.loss_config, config.num_scales)
        weights = weights[: bounds[newest][1]].clone()
        weights[bounds[newest][0]:] *= newest_weight
        if self.recipe.name == "code-refiner":
            weights[: bounds[self.recipe.draft_steps - 1][1]] *= self.drafted_scale_weight()
        return newest + 1, weights

    def drafted_scale_weight(self) -> float:
        """Refiner stage 1: 1 on every scale; stage 2: decays linearly 1 -> 0 on the drafter's scales."""
        stage2_start = self.recipe.stage1_fraction * self.total_steps
        if self.step < stage2_start:
            return 1.0
        return max(0.0, 1.0 - (self.step - stage2_start) / max(1.0, self.total_steps - stage2_start))

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        targets, features = self.tokenize(inputs)
        num_scales, weights = self.scales_and_weights()
        if self.kind == "ar":
            logits = self.model(labels, targets)
        elif self.teacher is not None:
            logits, teacher_logits = self.refiner_logits(labels, features, num_scales)
        else:
            logits = self.model(labels, features, num_scales=num_scales)
        targets = targets[:, : logits.shape[1]]
        ce = token_cross_entropy(logits, targets, self.loss_config.label_smoothing)
        metrics = {}
        if self.teacher is not None:
            kl = weighted_mean(distillation_kl(logits, teacher_logits, self.recipe.kd_temperature), weights)
            alpha = self.recipe.kd_alpha
            loss = alpha * kl + (1 - alpha) * weighted_mean(ce, weights) if alpha < 1 else kl
            metrics["kl"] = kl
        else:
            loss = weighted_mean(ce, weights)
        self.optimizer_step(loss, self.kind, self.model.parameters())
        with torch.no_grad():
            plain = token_cross_entropy(logits, targets) if self.loss_config.label_smoothing else ce
            correct = (logits.argmax(dim=-1) == targets).float()
            tail = self.tail_tokens(logits.shape[1])
            metrics.update(loss=loss, ce=plain.mean(), ce_tail=plain[:, tail:].mean(), acc=correct.mean(),
                           acc_tail=correct[:, tail:].mean())
        return metrics

    def refiner_logits(self, labels: torch.Tensor, features: torch.Tensor, num_scales: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and frozen-teacher logits for the same (label-dropped) conditions."""
        student = self.unwrap(self.model)
        labels = student.drop_labels(labels)  # the model is in train mode here
        with labels_as_given(student):
            logits = self.model(labels, features, num_scales=num_scales)
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(labels, features, num_scales=num_scales)
        return logits, teacher_logits

    def tail_tokens(self, length: int) -> int:
        """Index of the first token of the last trained scale (the whole map for AR)."""
        if self.kind == "ar":
            return 0
        return next(begin for begin, end in self.model_config.scale_bounds if end == length)

    # ------------------------------------------------------------------------------------------------
    def save_models(self, directory: Path) -> None:
        save_model(self.tokenizer, directory, "vqvae")
        save_model(self.inference_model(), directory, self.kind)

    def extra_state(self) -> dict:
        return self.trained_weights_state()

    def load_models(self, directory: Path, state: dict) -> None:
        self.load_trained(directory, state, self.kind)

    def sampler(self, model: VAR | RasterAR) -> VARSampler | ARSampler:
        """Plain sampling with the config's ``sample`` settings (scale loop for VAR, raster loop for AR)."""
        sampler_class = ARSampler if self.kind == "ar" else VARSampler
        return sampler_class(model, self.tokenizer, self.experiment.sample)

    @torch.no_grad()
    def write_samples(self) -> None:
        """A grid of class-conditional samples, one row per class."""
        model = self.inference_model()
        was_training = model.training
        model.eval()
        classes = torch.linspace(0, self.num_classes - 1, min(GRID_CLASSES, self.num_classes)).round().long()
        labels = classes.repeat_interleave(GRID_PER_CLASS).to(self.device)
        images = self.sampler(model).sample(labels, seed=0).images
        model.train(was_training)
        save_grid(images, self.run.samples / f"step_{self.step:07d}.png", nrow=GRID_PER_CLASS)
