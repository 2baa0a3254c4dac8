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

from var.models.kv_cache import KVCache
from var.models.var import AdaLNBlock, AdaLNHead, VARConfig, block_causal_mask


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


class RasterAR(nn.Module):
    """Class-conditional raster-order token transformer (label ``num_classes`` = null class)."""

    def __init__(self, cfg: ARConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or ARConfig(**overrides)
        self.config = cfg
        block_cfg = cfg.block_config()
        width = cfg.width
        self.num_classes = cfg.num_classes
        self.token_embed = nn.Embedding(cfg.vocab_size, width)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, width))
        nn.init.trunc_normal_(self.pos_embed, std=math.sqrt(1 / width / 3))
        self.register_buffer("positions", torch.arange(cfg.seq_len), persistent=False)
        drop_paths = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([AdaLNBlock(block_cfg, drop_paths[i]) for i in range(cfg.depth)])
        self.head_norm = AdaLNHead(width, cfg.vocab_size, cfg.norm_eps)
        self.head = nn.Linear(width, cfg.vocab_size)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """VAR's initialisation rule applied to the same block structure."""
        std = math.sqrt(1 / self.config.width / 3)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
        self.head.weight.mul_(init_head)
        self.head_norm.modulation.weight.mul_(init_adaln)
        width, depth = self.config.width, self.config.depth
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            block.modulation.weight[2 * width:].mul_(init_adaln)
            block.modulation.weight[: 2 * width].mul_(init_adaln_gamma)

    def check_labels(self, labels: torch.Tensor) -> None:
        bad = (labels < 0) | (labels > self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"label {int(labels[bad][0])} is out of range: this model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1}; {self.num_classes} is the null class)"
            )

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_embed(labels)

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

    def forward_hidden(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run every block on embedded inputs x (B, n, C)."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for layer, block in enumerate(self.blocks):
            x = block(x, cond, attn_mask, cache, layer)
        return x

    def logits(self, hidden: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(hidden.float(), cond).float()).float()

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
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        cond = self.class_condition(labels)
        x = self.input_tokens(cond, tokens[:, :-1], begin=0)
        hidden = self.forward_hidden(x, cond, attn_mask=self.causal_mask(0, x.shape[1], 0))
        return self.logits(hidden, cond)
