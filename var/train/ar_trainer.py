"""``var train --model ar``: the raster-order AR model, LlamaGen's architecture (var/models/llamagen.py), over
one token map of our tokenizer.

The tokenizer's latent is quantised as one scale (``patch_nums=(latent_side,)``); the bundle stores the
tokenizer with that single-scale schedule, so ``var sample --sampler ar`` decodes it as it was trained.
The stage's block settings map onto LlamaGen's: depth -> n_layer, width -> dim, num_heads -> n_head,
drop_rate -> token/residual/FFN dropout, attn_drop_rate, drop_path_rate, cond_drop_rate -> class dropout;
the FFN width is LlamaGen's SwiGLU rule and the initialisation is the official one (N(0, 0.02), zero head),
so VAR's AdaLN / l2-attention / mlp_ratio / init_* settings do not apply.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from var.config import TransformerModelConfig
from var.models.llamagen import LlamaGen, LlamaGenConfig
from var.models.var import TransformerConfig
from var.tokenizers.vqvae import VQVAE
from var.train.transformer import TransformerTrainer


class ARTrainer(TransformerTrainer):
    """Trains a class-conditional :class:`LlamaGen` with next-token cross-entropy over the whole token map."""

    kind = "ar"
    model_class = LlamaGen

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

    def new_model_config(self, architecture: TransformerConfig) -> LlamaGenConfig:
        tokenizer = self.tokenizer.config
        return LlamaGenConfig(
            dim=architecture.width, n_layer=architecture.depth, n_head=architecture.num_heads,
            token_dropout_p=architecture.drop_rate, resid_dropout_p=architecture.drop_rate,
            ffn_dropout_p=architecture.drop_rate, attn_dropout_p=architecture.attn_drop_rate,
            drop_path_rate=architecture.drop_path_rate, class_dropout_prob=architecture.cond_drop_rate,
            num_classes=self.num_classes, vocab_size=tokenizer.vocab_size, block_size=tokenizer.patch_nums[-1] ** 2,
        )

    def init_weights(self, model: LlamaGen, architecture: TransformerModelConfig) -> None:
        """LlamaGen initialises itself (the official rule) when built."""

    def setup_model(self, model: LlamaGen) -> None:
        self.token_weights = torch.ones(model.config.block_size, device=self.device)

    def tokenize(self, inputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (inputs if inputs.dtype == torch.long else self.encode(inputs)), None

    def scales_and_weights(self) -> tuple[None, torch.Tensor]:
        return None, self.token_weights

    def logits(self, labels, targets, extra, num_scales) -> tuple[torch.Tensor, None]:
        """Row T-1+j of the teacher-forced logits predicts token j."""
        return self.model(labels, targets[:, :-1])[:, self.model_config.cls_token_num - 1:], None
