"""Tokenizer training (``var train-tokenizer``): the multi-scale VQ-VAE on its own.

Objective = reconstruction (L1 or L2) + the quantiser's vq loss (codebook + commitment, spec_var 1.5 F)
+ optional LPIPS perceptual term + optional patch-GAN term (hinge).  The official repository ships no
tokenizer training code; this follows the paper's description.

Codebook health: on small data a randomly initialised codebook collapses onto a few codes.  With
``data_init`` the codebook starts as latent vectors of real images (what each scale actually quantises), and
codes unused for ``restart_every`` steps are re-drawn from the current batch's latent vectors (dead-code
restart; no restarts in the last fifth of the run, so the decoder settles on the final codebook).
Per-scale codebook usage (fraction of the vocabulary hit in the logging window) is logged as ``usage/sN``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast, reduce
from torch.func import functional_call

from var.checkpoints import save_model
from var.config import ExperimentConfig
from var.data.registry import build_dataset
from var.tokenizers.quantizer import area_down
from var.tokenizers.vqvae import VQVAE
from var.train.loop import Trainer
from var.train.optim import build_optimizer
from var.train.perceptual import PatchDiscriminator, hinge_discriminator_loss, load_perceptual_loss

RESTART_STOP_FRACTION = 0.8
PREVIEW_IMAGES = 8


@torch.no_grad()
def quantizer_inputs(vqvae: VQVAE, images: torch.Tensor) -> list[torch.Tensor]:
    """The vectors the quantiser snaps to codes, per scale: (B * pn * pn, Cvae) each.

    Scale si sees the area-downsampled residual f - f_hat_{si-1} (the full residual at the last scale).
    """
    f = vqvae.encode_latent(images).float()
    patch_nums = vqvae.patch_nums
    _, fhat_per_scale = vqvae.quantize.quantize(f)
    vectors, f_hat = [], torch.zeros_like(f)
    for si, pn in enumerate(patch_nums):
        rest = f - f_hat
        z = rest if si == len(patch_nums) - 1 else area_down(rest, pn)
        vectors.append(z.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        f_hat = fhat_per_scale[si]
    return vectors


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Fraction of the vocabulary used, per scale and overall, from hit counts (num_scales, V)."""
    usage = {f"usage/s{si}": float((row > 0).float().mean()) for si, row in enumerate(counts)}
    usage["usage/all"] = float((counts.sum(0) > 0).float().mean())
    return usage


class TokenizerTrainer(Trainer):
    """Trains ``experiment.tokenizer.model`` on ``experiment.data``; checkpoints hold ``vqvae.*``."""

    name = "tokenizer"
    postfix_keys = ("loss", "recon", "usage/all", "lr", "images_per_s")

    def __init__(self, experiment: ExperimentConfig, run_dir: str | Path, resume: bool = False,
                 progress: bool = True):
        super().__init__(experiment, experiment.tokenizer.train, run_dir, resume, progress)
        self.loss_config = experiment.tokenizer.loss
        if self.loss_config.reconstruction not in ("l1", "l2"):
            raise ValueError(f"tokenizer.loss.reconstruction must be 'l1' or 'l2', got "
                             f"'{self.loss_config.reconstruction}'")
        self.build()

    def build(self) -> None:
        data, model_config = self.experiment.data, self.experiment.tokenizer.model
        if data.image_size != model_config.image_size:
            raise ValueError(
                f"data.image_size={data.image_size} but the tokenizer's patch_nums {model_config.patch_nums} and "
                f"ch_mult {model_config.ch_mult} give {model_config.image_size} px images; make the last patch_num "
                f"data.image_size / {model_config.downsample}"
            )
        self.dataset = build_dataset(data, "train")
        vqvae = VQVAE(model_config).to(self.device)
        self.add_optimizer("tokenizer", build_optimizer(vqvae, self.config.optim, self.default_peak_lr()),
                           self.default_peak_lr())
        loss = self.loss_config
        self.perceptual = load_perceptual_loss() if loss.perceptual_weight > 0 else None
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        models = [vqvae]
        self.discriminator = None
        if loss.gan_weight > 0:
            self.discriminator = PatchDiscriminator(data.image_size).to(self.device)
            disc_lr = loss.discriminator_lr or self.default_peak_lr()
            self.add_optimizer("discriminator", build_optimizer(self.discriminator, self.config.optim, disc_lr),
                               disc_lr)
            models.append(self.discriminator)
        num_scales = len(model_config.patch_nums)
        self.restart_counts = torch.zeros(num_scales, model_config.vocab_size, device=self.device)
        self.window_counts = torch.zeros_like(self.restart_counts)
        self.preview = torch.stack([build_dataset(data, "val")[i][0] for i in range(PREVIEW_IMAGES)])
        self.prepare(*models)
        if self.discriminator is not None:
            self.discriminator = self.prepared[1]
        if self.resume_from is None and loss.data_init:
            self.reinitialise_codes(torch.ones(model_config.vocab_size, dtype=torch.bool, device=self.device))

    @property
    def vqvae(self) -> VQVAE:
        return self.unwrap(self.model)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reinitialise_codes(self, dead: torch.Tensor, images: torch.Tensor | None = None) -> int:
        """Replace the codes flagged in ``dead`` (V,) by latent vectors of real images; returns how many.

        Every process applies the main process's choice, so replicas stay identical.
        """
        if images is None:  # initialisation: a fixed draw of training images
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed))
            images = torch.stack([self.dataset[int(i)][0] for i in order[: 4 * self.config.batch_size]])
        vectors = torch.cat(quantizer_inputs(self.vqvae, images.to(self.device)))
        count = int(dead.sum())
        picks = torch.randint(len(vectors), (count,), device=self.device)
        replacement = broadcast(vectors[picks].contiguous(), from_process=0)
        self.vqvae.quantize.embedding.weight[dead] = replacement
        return count

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss_config = self.loss_config
        recon, vq_loss, indices = self.model(images)
        if loss_config.reconstruction == "l1":
            recon_loss = F.l1_loss(recon, images)
        else:
            recon_loss = F.mse_loss(recon, images)
        loss = loss_config.reconstruction_weight * recon_loss + loss_config.vq_weight * vq_loss
        metrics = {"recon": recon_loss, "vq": vq_loss}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, images)
            loss = loss + loss_config.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual
        use_gan = self.discriminator is not None and self.step >= loss_config.gan_start
        if use_gan:
            # the generator's adversarial loss must not push gradients into the critic: score with frozen copies
            critic = self.unwrap(self.discriminator)
            frozen = {name: p.detach() for name, p in critic.named_parameters()}
            generator_loss = -functional_call(critic, frozen, (recon,)).mean()
            loss = loss + loss_config.gan_weight * generator_loss
            metrics["gan_g"] = generator_loss
        self.optimizer_step(loss, "tokenizer", self.model.parameters())
        if use_gan:
            real, fake = self.discriminator(images), self.discriminator(recon.detach())
            critic_loss = hinge_discriminator_loss(real, fake)
            self.optimizer_step(critic_loss, "discriminator", self.discriminator.parameters())
            metrics["gan_d"] = critic_loss
        metrics["loss"] = loss
        self.count_codes(indices, images)
        return metrics

    @torch.no_grad()
    def count_codes(self, indices: list[torch.Tensor], images: torch.Tensor) -> None:
        vocab = self.vqvae.config.vocab_size
        hits = torch.stack([torch.bincount(idx.flatten(), minlength=vocab) for idx in indices]).float()
        self.restart_counts += hits
        self.window_counts += hits
        every = self.loss_config.restart_every
        last_restart = RESTART_STOP_FRACTION * self.total_steps
        if every and self.accelerator.sync_gradients and (self.step + 1) % every == 0 and self.step < last_restart:
            dead = reduce(self.restart_counts.sum(0), reduction="sum") == 0
            if bool(dead.any()):
                self.reinitialise_codes(dead, images)
            self.restart_counts.zero_()

    def window_metrics(self) -> dict[str, float]:
        usage = codebook_usage(reduce(self.window_counts, reduction="sum"))
        self.window_counts.zero_()
        return usage

    # ------------------------------------------------------------------------------------------------
    def save_models(self, directory: Path) -> None:
        save_model(self.inference_model(), directory, "vqvae")

    def extra_state(self) -> dict:
        # each process counts its own batches and a restart looks at their sum: save the sum, resume it on one process
        counts = reduce(self.restart_counts, reduction="sum").cpu()
        state = {"restart_counts": counts, **self.trained_weights_state()}
        if self.discriminator is not None:
            state["discriminator"] = self.unwrap(self.discriminator).state_dict()
        return state

    def load_models(self, directory: Path, state: dict) -> None:
        self.load_trained(directory, state, "vqvae")
        self.restart_counts.copy_(state["restart_counts"] if self.is_main else torch.zeros_like(self.restart_counts))
        if self.discriminator is not None:
            self.unwrap(self.discriminator).load_state_dict(state["discriminator"])

    @torch.no_grad()
    def write_samples(self) -> None:
        """Validation images (top row, labelled "original") above their reconstructions (bottom row)."""
        model = self.inference_model()
        was_training = model.training
        model.eval()
        images = self.preview.to(self.device)
        recon = model.decode(model.encode(images))
        model.train(was_training)
        self.save_sample_grid(torch.cat((images, recon)).add(1).mul(0.5), len(images),
                              ["original", "reconstruction"])
