"""Raster-order autoregressive baseline: next-token prediction over one token map (LlamaGen-style c2i).

The sequence is the tokenizer's single-scale token map (side x side tokens, row-major), preceded by a
start token built from the class embedding.  Position l predicts token l from the start token and tokens
< l (causal mask).  It reuses the VAR blocks (AdaLN conditioning on the class, l2-normalised attention,
the shared KV cache), so the only differences from VAR are the ordering and the discrete token input.
This is the model speculative Jacobi decoding accelerates (var/sample/sjd.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from var.models.var import ConditionalTransformer, VARConfig, block_causal_mask


@dataclass
class ARConfig:
    """Every constructor argument of :class:`RasterAR`; saved beside each checkpoint as JSON."""

    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    vocab_size: int = 4096
    num_classes: int = 1000
    side: int = 16  # the token map is side x side
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True

    def __post_init__(self) -> None:
        self.width = self.width or 64 * self.depth
        self.num_heads = self.num_heads or self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24

    @property
    def seq_len(self) -> int:
        return self.side * self.side

    def block_config(self) -> VARConfig:
        """The VAR block hyper-parameters these blocks are built from."""
        return VARConfig(
            depth=self.depth, width=self.width, num_heads=self.num_heads, vocab_size=self.vocab_size,
            num_classes=self.num_classes, patch_nums=(self.side,), mlp_ratio=self.mlp_ratio,
            drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rate,
            norm_eps=self.norm_eps, cond_drop_rate=self.cond_drop_rate, attn_l2_norm=self.attn_l2_norm,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RasterAR(ConditionalTransformer):
    """Class-conditional raster-order token transformer (label ``num_classes`` = null class)."""

    def __init__(self, cfg: ARConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ARConfig(**overrides)
        self.config = cfg
        width = cfg.width
        self._build_stack(cfg.block_config())
        self.token_embed = nn.Embedding(cfg.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, width))
        self.register_buffer("positions", torch.arange(cfg.seq_len), persistent=False)
        self.init_weights()
        nn.init.trunc_normal_(self.pos_embed, std=math.sqrt(1 / width / 3))

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
