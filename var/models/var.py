"""The VAR transformer: class-conditional next-scale prediction.

A sequence is the concatenation of the token maps of all scales (1 + 4 + ... + 256 = 680 tokens at 256 px).
Position l of the sequence predicts token l; the inputs of scale si are derived from scales < si only
(the SOS token for scale 0, the area-downsampled running f_hat for later scales), so a block-causal mask
(each token sees its own scale and all earlier ones) trains every scale in one pass, and sampling runs one
scale per forward pass on top of a key/value cache.

The blocks are AdaLN self-attention blocks conditioned on the class embedding; attention uses
l2-normalised queries and keys with a learned per-head temperature.  Numerics follow the official model
(spec_var.md section 2), so official checkpoints load through var/checkpoints.py and give the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from var.models.family import Conditions, ScaleSchedule, resolve_labels
from var.models.kv_cache import KVCache
from var.pretrained import PretrainedMixin

MAX_LOG_TEMPERATURE = math.log(100)


@dataclass
class TransformerConfig:
    """Architecture of the AdaLN transformer blocks shared by VAR and the training configs.

    ``width``, ``num_heads`` and ``drop_path_rate`` default to the official depth rule: width 64*depth,
    depth heads of 64 dims, drop path 0.1*depth/24.
    """

    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True

    def __post_init__(self) -> None:
        if self.width is None:
            self.width = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VARConfig(TransformerConfig):
    """Every constructor argument of :class:`VAR`; saved beside each checkpoint as JSON."""

    vocab_size: int = 4096
    z_channels: int = 32
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums must be strictly increasing, got {self.patch_nums}")

    @property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule.square(self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def tokens_per_scale(self) -> list[int]:
        return self.schedule.tokens

    @property
    def seq_len(self) -> int:
        return self.schedule.length

    @property
    def scale_bounds(self) -> list[tuple[int, int]]:
        """(begin, end) token range of every scale in the full sequence."""
        return self.schedule.bounds


class SelfAttention(nn.Module):
    """Multi-head attention with l2-normalised q/k, a learned per-head temperature and no key bias."""

    def __init__(self, width: int, num_heads: int, attn_drop: float, l2_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.l2_norm = l2_norm
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        if l2_norm:
            # log of the per-head attention temperature, clamped at log(100)
            self.log_temperature = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.softmax_scale = 1.0
        else:
            self.softmax_scale = 0.25 / math.sqrt(self.head_dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, n, head_dim)
        if self.l2_norm:
            temperature = self.log_temperature.clamp_max(MAX_LOG_TEMPERATURE).exp()
            q = F.normalize(q, dim=-1).mul(temperature)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dtype = v.dtype
        out = F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.softmax_scale,
        )
        if cache is not None:  # the hook sees the queries exactly as the softmax does
            cache.after_attention(layer, q if self.softmax_scale == 1.0 else q * self.softmax_scale, k)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if torch.is_grad_enabled():
            hidden = F.gelu(hidden, approximate="tanh")
        else:  # the same values in place: no second (tokens x 4C) buffer per block
            hidden = torch.ops.aten.gelu_(hidden, approximate="tanh")
        return self.drop(self.fc2(hidden))


class AdaLNBlock(nn.Module):
    """x += gamma1 * Attn(LN(x)(1+scale1)+shift1); x += gamma2 * FFN(LN(x)(1+scale2)+shift2).

    The six modulation vectors come, in the order gamma1, gamma2, scale1, scale2, shift1, shift2, from a
    per-block linear of the class embedding or, with shared AdaLN, from one model-level linear plus a
    learned per-block offset.
    """

    def __init__(self, cfg: TransformerConfig, drop_path: float):
        super().__init__()
        width = cfg.width
        self.width = width
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(width, cfg.num_heads, cfg.attn_drop_rate, cfg.attn_l2_norm)
        self.ffn = FeedForward(width, round(width * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:
            self.modulation_offset = nn.Parameter(torch.empty(1, 1, 6, width))  # drawn by init_weights
        else:
            self.modulation = nn.Linear(width, 6 * width)

    def modulations(self, cond: torch.Tensor) -> torch.Tensor:
        """The six modulation vectors (B, 1, 6, C) from the class embedding (B, C), or from the shared
        modulation (B, 1, 6, C) with shared AdaLN."""
        if self.shared_aln:
            return self.modulation_offset + cond
        return self.modulation(F.silu(cond)).view(-1, 1, 6, self.width)

    def forward(
        self,
        x: torch.Tensor,
        mods: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, n, C) through the block modulated by ``mods`` (B, 1, 6, C) (:meth:`modulations`)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)  # each (B, 1, C)
        h = self.norm(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.drop_path(self.attn(h, attn_mask, cache, layer).mul_(gamma1))
        h = self.norm(x).mul(scale2.add(1)).add_(shift2)
        return x + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNHead(nn.Module):
    """LN(x)(1+scale)+shift from the raw class embedding, then the vocabulary projection."""

    def __init__(self, width: int, vocab_size: int, eps: float):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(F.silu(cond)).view(-1, 1, 2, self.width).unbind(2)
        return self.norm(x).mul(scale.add(1)).add_(shift)


def block_causal_mask(query_scales: torch.Tensor, key_scales: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (n_query, n_key): a query sees every key of its own or an earlier group.

    Groups are scale indices for VAR (bidirectional inside a scale) or positions for a raster model.
    """
    return query_scales[:, None] >= key_scales[None, :]


@dataclass
class ClassRows:
    """The condition rows of one sampling batch (:meth:`ConditionalTransformer.condition`): class embeddings
    (rows, C) and, from the first pass on, every block's AdaLN modulation of them.

    The modulations depend on the classes only, so the batch's later scales reuse them: the official sampler
    recomputes them at every scale, a (rows x C) @ (C x 6C) product per block that reads as many weights as
    the block's attention and MLP together.  Reuse is exact (the same product of the same operands).
    """

    embedding: torch.Tensor
    _modulations: dict = field(default_factory=dict, repr=False)  # autocast dtype (None: off) -> per block

    @staticmethod
    def of(cond: ClassRows | torch.Tensor) -> ClassRows:
        return cond if isinstance(cond, ClassRows) else ClassRows(cond)

    def modulations(self, model: ConditionalTransformer) -> list[torch.Tensor]:
        """``model.block_modulations(embedding)``, computed once per autocast dtype (every time with autograd)."""
        if torch.is_grad_enabled():
            return model.block_modulations(self.embedding)
        device = self.embedding.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if dtype not in self._modulations:
            self._modulations[dtype] = model.block_modulations(self.embedding)
        return self._modulations[dtype]


class ConditionalTransformer(PretrainedMixin, nn.Module):
    """VAR's class-conditional AdaLN stack: a class embedding with a null class (index
    ``num_classes``), a stack of AdaLN blocks that runs on the shared KV cache, the AdaLN head, the official
    initialisation and the class conditions of var/models/family.py."""

    hub_role = "transformer"
    position_parameters: tuple[str, ...] = ()  # learned position tables, drawn with std sqrt(1 / (3 width))

    def __init__(self, cfg: TransformerConfig):
        """The stack of a config with ``vocab_size`` and ``num_classes`` besides the block architecture."""
        super().__init__()
        self.config = cfg
        width = cfg.width
        self.num_classes = cfg.num_classes
        self.class_embed = nn.Embedding(cfg.num_classes + 1, width)
        self.shared_modulation = nn.Linear(width, 6 * width) if cfg.shared_aln else None
        drop_paths = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([AdaLNBlock(cfg, drop_paths[i]) for i in range(cfg.depth)])
        self.head_norm = AdaLNHead(width, cfg.vocab_size, cfg.norm_eps)
        self.head = nn.Linear(width, cfg.vocab_size)

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @torch.no_grad()
    def init_weights(
        self,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        init_std: float = -1,
    ) -> None:
        """The official initialisation (spec_var.md 2.9): truncated normal linears/embeddings, small AdaLN
        gates and head, residual projections scaled down with depth.

        Every parameter is (re)drawn or reset here, in a fixed order, so the weights depend only on the
        global RNG state when this runs: the constructors call it, and building a model after
        ``torch.manual_seed(s)`` gives the same weights in every process.
        """
        width, depth = self.config.width, self.config.depth
        position_std = math.sqrt(1 / width / 3)
        if init_std < 0:
            init_std = position_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=init_std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=init_std)
            elif isinstance(module, SelfAttention):
                module.q_bias.zero_()
                module.v_bias.zero_()
                if module.l2_norm:
                    module.log_temperature.fill_(math.log(4.0))
        for name in self.position_parameters:
            nn.init.trunc_normal_(getattr(self, name), std=position_std)
        self.head.weight.mul_(init_head)
        self.head_norm.modulation.weight.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if self.shared_modulation is not None:
                block.modulation_offset.normal_().div_(math.sqrt(width))
                block.modulation_offset[:, :, 2:].mul_(init_adaln)
                block.modulation_offset[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.modulation.weight[2 * width:].mul_(init_adaln)
                block.modulation.weight[: 2 * width].mul_(init_adaln_gamma)

    def check_labels(self, labels: torch.Tensor) -> None:
        """Raise a ValueError for labels outside [0, num_classes] (num_classes = the null class)."""
        bad = (labels < 0) | (labels > self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"label {int(labels[bad][0])} is out of range: this model has {self.num_classes} classes "
                f"(0..{self.num_classes - 1}; {self.num_classes} is the null class for unconditional samples)"
            )

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Class embedding (B, C): the start-token content and the AdaLN condition."""
        return self.class_embed(labels)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free-guidance training: in train mode each label becomes the null class with
        probability ``cond_drop_rate``.  (The official VAR drops labels in eval mode too; we do not.)"""
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        return labels

    # -- class conditions for samplers (var/models/family.py) ---------------------------------------------
    def resolve_conditions(
        self,
        labels: torch.Tensor | Sequence[int] | int | None,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Validated class labels (B,) on the model's device (:func:`~var.models.family.resolve_labels`)."""
        return resolve_labels(labels, self.num_classes, self.class_embed.weight.device, batch_size, generator)

    def condition_batch_size(self, labels: Conditions) -> int:
        return labels.shape[0]

    def condition(self, labels: Conditions, guided: bool) -> ClassRows:
        """Class rows (:class:`ClassRows`): the labels, then (``guided``) as many null-class rows."""
        if guided:
            labels = torch.cat((labels, torch.full_like(labels, self.num_classes)))
        return ClassRows(self.class_condition(labels))

    def block_modulations(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """Every block's AdaLN modulation (B, 1, 6, C) for class embeddings ``cond`` (B, C), in the autocast
        dtype when autocast is on.  They depend on the classes only: a sampler computes them once per batch
        (:class:`ClassRows`) instead of once per scale."""
        block_cond = cond
        if self.shared_modulation is not None:
            block_cond = self.shared_modulation(F.silu(cond)).view(-1, 1, 6, self.config.width)
        if torch.is_autocast_enabled(cond.device.type):
            block_cond = block_cond.to(torch.get_autocast_dtype(cond.device.type))
        return [block.modulations(block_cond) for block in self.blocks]

    def forward_hidden(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        modulations: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run every block on embedded tokens x (B, n, C); returns hidden states (B, n, C).

        ``modulations``: :meth:`block_modulations` of ``cond`` when the caller already has them.
        """
        if modulations is None:
            modulations = self.block_modulations(cond)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        for layer, (block, mods) in enumerate(zip(self.blocks, modulations, strict=True)):
            x = block(x, mods, attn_mask, cache, layer)
        return x

    def logits(self, hidden: torch.Tensor, cond: ClassRows | torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (B, n, V) in float32 (``cond``: class rows or embeddings (B, C))."""
        cond = ClassRows.of(cond).embedding
        return self.head(self.head_norm(hidden.float(), cond).float()).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class VAR(ConditionalTransformer):
    """Class-conditional next-scale-prediction transformer.

    Inputs of scales 1.. are continuous Cvae-dimensional features (from the tokenizer), embedded by
    ``word_embed``; scale 0's input is the SOS token built from the class embedding.  Label ``num_classes``
    is the null (unconditional) class used for classifier-free guidance and label dropout.
    """

    sampling_rule = "var"
    position_parameters = ("pos_start", "pos_embed")
    draws_per_token = 1

    def __init__(self, cfg: VARConfig | None = None, **overrides):
        cfg = cfg or VARConfig(**overrides)
        super().__init__(cfg)
        width = cfg.width
        self.word_embed = nn.Linear(cfg.z_channels, width)
        self.pos_start = nn.Parameter(torch.empty(1, cfg.patch_nums[0] ** 2, width))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, width))
        self.level_embed = nn.Embedding(cfg.num_scales, width)
        scale_of_token = torch.cat([torch.full((n,), si) for si, n in enumerate(cfg.tokens_per_scale)])
        self.register_buffer("scale_of_token", scale_of_token, persistent=False)  # (L,)
        self.init_weights()

    @property
    def schedule(self) -> ScaleSchedule:
        return self.config.schedule

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a ValueError when a VQ-VAE cannot decode this VAR's tokens (vocabulary, channels, scales)."""
        problems = []
        if tokenizer.config.vocab_size != self.config.vocab_size:
            problems.append(f"vocab_size {tokenizer.config.vocab_size} vs {self.config.vocab_size}")
        if tokenizer.config.z_channels != self.config.z_channels:
            problems.append(f"z_channels {tokenizer.config.z_channels} vs {self.config.z_channels}")
        if tuple(tokenizer.patch_nums) != tuple(self.config.patch_nums):
            problems.append(f"patch_nums {tokenizer.patch_nums} vs {self.config.patch_nums}")
        if problems:
            raise ValueError("tokenizer and transformer do not match: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------------------
    # inputs and masks (the blocks, head and initialisation are ConditionalTransformer's)
    def input_tokens(self, cond: torch.Tensor, features: torch.Tensor | None, begin: int) -> torch.Tensor:
        """Embedded transformer inputs for the token range starting at ``begin``.

        Args:
            cond: class embedding (B, C); used only when ``begin == 0`` (the SOS block).
            features: continuous inputs (B, n, Cvae) of the tokens after the SOS block (or None).
            begin: index of the first token in the full sequence.
        Returns (B, n_tokens, C): [SOS + pos_start ;] word_embed(features), plus level and position embeddings.
        """
        parts = []
        if begin == 0:
            first = self.pos_start.shape[1]
            parts.append(cond.unsqueeze(1).expand(-1, first, -1) + self.pos_start)
        if features is not None and features.shape[1] > 0:
            parts.append(self.word_embed(features.float()))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        end = begin + x.shape[1]
        return x + (self.level_embed(self.scale_of_token[begin:end]) + self.pos_embed[0, begin:end])

    def scale_mask(self, first_scale: int, last_scale: int, cached_tokens: int) -> torch.Tensor | None:
        """Block-causal mask for one pass over scales first..last on top of ``cached_tokens`` cached tokens.

        Cached tokens belong to earlier scales and are visible to every query; None for a single scale.
        """
        if first_scale == last_scale:
            return None
        bounds = self.config.scale_bounds
        query_scales = self.scale_of_token[bounds[first_scale][0]: bounds[last_scale][1]]
        key_scales = torch.cat((torch.full_like(query_scales[:1], -1).expand(cached_tokens), query_scales))
        return block_causal_mask(query_scales, key_scales)

    def forward_scales(
        self, cond: ClassRows | torch.Tensor, first: int, last: int, inputs: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """One block-causal pass over scales first..last on top of the cached earlier scales
        (:class:`~var.models.family.ScaleModel`); returns hidden states (rows, tokens of first..last, C)."""
        rows = ClassRows.of(cond)
        x = self.input_tokens(rows.embedding, inputs, self.config.scale_bounds[first][0])
        mask = self.scale_mask(first, last, cache.length if cache is not None else 0)
        return self.forward_hidden(x, rows.embedding, attn_mask=mask, cache=cache, modulations=rows.modulations(self))

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        labels: torch.Tensor,
        teacher_features: torch.Tensor,
        num_scales: int | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass: logits (B, L, V) for every token of every scale.

        Args:
            labels: (B,) class labels; in training mode each is replaced by the null class with probability
                ``cond_drop_rate`` (classifier-free guidance).  In eval mode labels are used as given.
            teacher_features: (B, L - first_l, Cvae) from ``MultiScaleQuantizer.teacher_forcing_input``.
            num_scales: train only the first ``num_scales`` scales (progressive training); default all.
        """
        self.check_labels(labels)
        num_scales = num_scales or self.config.num_scales
        end = self.config.scale_bounds[num_scales - 1][1]
        labels = self.drop_labels(labels)
        first = self.pos_start.shape[1]
        with torch.autocast(device_type=labels.device.type, enabled=False):
            cond = self.class_condition(labels)
            x = self.input_tokens(cond, teacher_features[:, : end - first], begin=0)
        mask = self.scale_mask(0, num_scales - 1, 0)
        hidden = self.forward_hidden(x, cond, attn_mask=mask)
        return self.logits(hidden, cond)


def build_var(depth: int, **overrides) -> VAR:
    """A VAR with the official size rule and initialisation for ``depth`` (16, 20, 24, 30, 36, ...);
    ``init_*`` overrides go to :meth:`VAR.init_weights`."""
    init_args = {k: overrides.pop(k) for k in list(overrides) if k.startswith("init_")}
    model = VAR(VARConfig(depth=depth, **overrides))
    if init_args:
        model.init_weights(**init_args)
    return model


def patch_nums_from_tokens(tokens_per_scale: Sequence[int]) -> tuple[int, ...]:
    """Recover square scale sides from token counts per scale."""
    sides = []
    for n in tokens_per_scale:
        side = math.isqrt(int(n))
        if side * side != n:
            raise ValueError(f"a scale with {n} tokens is not square")
        sides.append(side)
    return tuple(sides)
