"""Raster-order autoregressive baseline: next-token prediction over one token map (LlamaGen-style c2i).

The sequence is the tokenizer's single-scale token map (side x side tokens, row-major), preceded by a
start token built from the class embedding.  Position l predicts token l from the start token and tokens
< l (causal mask).  It reuses the VAR blocks (AdaLN conditioning on the class, l2-normalised attention,
the shared KV cache), so the only differences from VAR are the ordering and the discrete token input.
This is the model speculative Jacobi decoding accelerates (var/sample/speculative/sjd.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from var.models.kv_cache import KVCache
from var.models.var import ConditionalTransformer, TransformerConfig, block_causal_mask


@dataclass
class ARConfig(TransformerConfig):
    """Every constructor argument of :class:`RasterAR`; saved beside each checkpoint as JSON."""

    vocab_size: int = 4096
    num_classes: int = 1000
    side: int = 16  # the token map is side x side

    @property
    def seq_len(self) -> int:
        return self.side * self.side


class RasterAR(ConditionalTransformer):
    """Class-conditional raster-order token transformer (label ``num_classes`` = null class).

    A :class:`~var.models.family.RasterModel` with one condition position (T = 1): the start token.
    """

    sampling_rule = "raster-ar"
    position_parameters = ("pos_embed",)

    def __init__(self, cfg: ARConfig | None = None, **overrides):
        cfg = cfg or ARConfig(**overrides)
        super().__init__(cfg)
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, cfg.width))
        self.register_buffer("positions", torch.arange(cfg.seq_len), persistent=False)
        self.init_weights()

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.side, self.config.side

    def condition_length(self, cond: torch.Tensor) -> int:
        return 1

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a ValueError when the tokenizer's single-scale latent does not hold this model's token map."""
        problems = []
        if tokenizer.config.vocab_size != self.config.vocab_size:
            problems.append(f"vocab_size {tokenizer.config.vocab_size} vs {self.config.vocab_size}")
        if self.config.side != tokenizer.patch_nums[-1]:
            problems.append(f"latent side {tokenizer.patch_nums[-1]} vs the AR's token map side {self.config.side}")
        if problems:
            raise ValueError("tokenizer and transformer do not match: " + "; ".join(problems))

    def input_tokens(self, cond: torch.Tensor, tokens: torch.Tensor | None, begin: int) -> torch.Tensor:
        """Embedded inputs of positions begin.. : the start token at position 0, then embed(previous token).

        ``tokens`` (B, n) are the tokens *fed* at those positions, i.e. the tokens of positions begin-1...
        """
        batch = cond.shape[0]
        fed = tokens if tokens is not None else cond.new_zeros(batch, 0, dtype=torch.long)
        if begin == 0:  # position 0 takes the start token; a placeholder keeps tokens aligned with positions
            fed = torch.cat((fed.new_zeros(batch, 1), fed), dim=1)
        positions = torch.arange(begin, begin + fed.shape[1], device=cond.device).expand(batch, -1)
        return self.inputs_at(cond, fed, positions)

    def inputs_at(self, cond: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embedded inputs at per-row positions (B, n): the start token where a position is 0, else
        embed(tokens), where ``tokens[b, i]`` is the token fed at ``positions[b, i]`` (that of the position
        before).  Rows may sit at different positions (ragged speculative windows)."""
        x = self.token_embed(tokens)
        x = torch.where((positions == 0).unsqueeze(-1), cond.unsqueeze(1).to(x.dtype), x)
        return x + self.pos_embed[0, positions]

    def forward_positions(self, cond: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                          cache: KVCache | None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (rows, n, C) of inputs at absolute positions (rows, n), over the cache
        (:class:`~var.models.family.RasterModel`; position 0 is the start token)."""
        return self.forward_hidden(self.inputs_at(cond, tokens, positions), cond, attn_mask, cache)

    def causal_mask(self, begin: int, count: int, cached_tokens: int) -> torch.Tensor | None:
        """Causal mask for ``count`` new positions starting at ``begin`` on top of the cached ones."""
        if count == 1:
            return None
        queries = self.positions[begin: begin + count]
        keys = torch.cat((self.positions[:cached_tokens], queries))
        return block_causal_mask(queries, keys)

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) for the full token map ``tokens`` (B, L)."""
        self.check_labels(labels)
        labels = self.drop_labels(labels)
        cond = self.class_condition(labels)
        x = self.input_tokens(cond, tokens[:, :-1], begin=0)
        hidden = self.forward_hidden(x, cond, attn_mask=self.causal_mask(0, x.shape[1], 0))
        return self.logits(hidden, cond)
