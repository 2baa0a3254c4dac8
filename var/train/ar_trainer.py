"""``var train --model ar``: the raster-order AR baseline (var/models/ar.py) over one token map.

The tokenizer's latent is quantised as one scale (``patch_nums=(latent_side,)``); the bundle stores the
tokenizer with that single-scale schedule, so ``var sample --sampler ar`` decodes it as it was trained.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from var.models.ar import ARConfig, RasterAR
from var.models.var import TransformerConfig
from var.tokenizers.vqvae import VQVAE
from var.train.transformer import TransformerTrainer


class ARTrainer(TransformerTrainer):
    """Trains a :class:`RasterAR` with next-token cross-entropy over the whole token map."""

    kind = "ar"
    model_class = RasterAR

    def check_config(self) -> None:
        recipe, loss = self.recipe_config, self.loss_config
        if recipe.name != "standard" or loss.progressive > 0 or loss.scale_weights:
            raise ValueError("--model ar trains one raster sequence: CoDe recipes, progressive training and "
                             "scale_weights apply to VAR only")
        super().check_config()

    @torch.no_grad()
    def adapt_tokenizer(self, tokenizer: VQVAE) -> VQVAE:
        """The tokenizer quantising the whole latent as one raster token map (patch_nums=(side,)).

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

    def new_model_config(self, architecture: TransformerConfig) -> ARConfig:
        tokenizer = self.tokenizer.config
        return ARConfig(**self.architecture(architecture), vocab_size=tokenizer.vocab_size,
                        num_classes=self.num_classes, side=tokenizer.patch_nums[-1])

    def setup_model(self, model: RasterAR) -> None:
        self.token_weights = torch.ones(model.config.seq_len, device=self.device)

    def tokenize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (inputs if inputs.dtype == torch.long else self.encode(inputs)), None

    def scales_and_weights(self) -> tuple[None, torch.Tensor]:
        return None, self.token_weights

    def logits(self, labels, targets, extra, num_scales) -> tuple[torch.Tensor, None]:
        return self.model(labels, targets), None
