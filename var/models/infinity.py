"""The Infinity transformer: text-to-image bitwise next-scale prediction (spec_infinity.md section 3).

Infinity is VAR for text: a block-causal transformer predicts an image scale by scale, each scale's tokens
at once, on top of a key/value cache of the earlier scales.  What differs from VAR:

* the condition is a prompt: flan-t5 features, RMS-normalised, pooled by one learned attention query into
  ``pooled`` (the start token and the AdaLN condition) and projected into a cross-attention memory that
  every block reads, each image only its own prompt's tokens;
* tokens are d-bit codes of the BSQ tokenizer (var/tokenizers/bsq.py): the head gives two logits per bit,
  (B, n, 2d), sampled as n*d independent two-way draws (:func:`bit_logits`);
* positions are 2-D RoPE on the template's common grid (var/models/infinity_schedules.py), so one model
  serves every aspect ratio and resolution of the official table; the level embedding marks the scale.

Numerics follow the official model, pitfalls included: cosine self-attention with scale 1 and a clamped
per-head temperature; the AdaLN chunk order gamma1, gamma2, scale1, scale2, shift1, shift2 from a shared
linear plus a per-block offset; the head modulated by ``pooled``, not by the shared AdaLN; level embedding
added before block 0 only; and the official cross-attention (and text pool) rounding q, k, v and its
output to bfloat16 even in float32 (``cross_attn_bf16``, on by default; off gives float32 cross-attention).

The scale-wise protocol samplers use:

* :meth:`Infinity.condition` -> :class:`InfinityCondition` (optionally the guidance batch [cond; uncond]);
* :meth:`Infinity.forward_scales` runs scales first..last on top of a KV cache (var/models/kv_cache.py) with
  the RoPE offsets of the scale position, and an ``after_layer`` callback for hidden-state guidance;
* :meth:`Infinity.logits` / :func:`bit_logits` turn hidden states into (R, n, 2d) / (R, n*d, 2) logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from var.models.family import ScaleSchedule
from var.models.infinity_schedules import resolve_schedule, rope_positions, schedule_for
from var.models.kv_cache import KVCache
from var.models.var import MAX_LOG_TEMPERATURE, AdaLNHead, FeedForward, block_causal_mask

ROPE_BASE = 10000.0
ROPE_MAX_GRID = 128  # rows / columns of the RoPE angle table (the official 2048 px / 16)


@dataclass
class InfinityConfig:
    """Every constructor argument of :class:`Infinity`; the defaults are Infinity-2B's."""

    depth: int = 32
    width: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    bits_per_token: int = 32  # d of the tokenizer (4d with spatial patchify)
    text_channels: int = 2048  # Ct5, flan-t5-xl's width
    text_maxlen: int = 512  # rows of the learned empty text (longest prompt, in T5 tokens)
    text_pool_heads: int | None = None  # None: the official rule Ct5 // 128 (Ct5 // 64 above width 4096)
    num_levels: int = 15  # rows of the level embedding: the most scales a schedule may have
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1  # training only: a prompt becomes the empty text with this probability
    cross_attn_bf16: bool = True  # emulate the official bf16 rounding of cross-attention in float32

    def __post_init__(self) -> None:
        if self.text_pool_heads is None:
            self.text_pool_heads = self.text_channels // (128 if self.width <= 4096 else 64)
        if self.width % self.num_heads or self.head_dim % 4:
            raise ValueError(
                f"width {self.width} / num_heads {self.num_heads} must give a head dim divisible by 4 (2-D RoPE)"
            )
        if self.ffn_hidden < 1:
            raise ValueError(
                f"the FFN width round(width * mlp_ratio / 256) * 256 is 0 for width {self.width}: use a width of "
                "at least 128 / mlp_ratio"
            )
        if self.text_pool_heads < 1 or self.width % self.text_pool_heads:
            raise ValueError(
                f"the text pool has {self.text_pool_heads} heads (text_channels {self.text_channels} // 128), "
                f"which must be >= 1 and divide width {self.width}"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """round(width * mlp_ratio / 256) * 256, Python rounding (8192 for the 2B)."""
        return round(self.width * self.mlp_ratio / 256) * 256

    def to_dict(self) -> dict:
        return asdict(self)


# The official model types of tools/run_infinity.py (depth, width and heads as it sets them).
INFINITY_SIZES: dict[str, dict] = {
    "infinity_2b": dict(depth=32, width=2048, num_heads=16),
    "infinity_8b": dict(depth=40, width=3584, num_heads=28, bits_per_token=56),  # 14-bit codes, 2x2 patchify
    "infinity_layer12": dict(depth=12, width=768, num_heads=8),
    "infinity_layer16": dict(depth=16, width=1152, num_heads=12),
    "infinity_layer24": dict(depth=24, width=1536, num_heads=16),
    "infinity_layer32": dict(depth=32, width=2080, num_heads=20),
    "infinity_layer40": dict(depth=40, width=2688, num_heads=24),
    "infinity_layer48": dict(depth=48, width=3360, num_heads=28),
}


# --------------------------------------------------------------------------------------------------
# text conditions
@dataclass
class PackedText:
    """Prompt features of variable length packed without padding: rows lens[0], then lens[1], ...

    This is the official text argument (``kv_compact`` with its lengths); the lengths include the EOS token.
    """

    features: torch.Tensor  # (sum(lens), Ct5)
    lens: tuple[int, ...]

    def __post_init__(self) -> None:
        self.lens = tuple(int(n) for n in self.lens)
        if self.features.ndim != 2 or self.features.shape[0] != sum(self.lens):
            raise ValueError(
                f"packed text features must be (sum(lens) = {sum(self.lens)}, Ct5), got {tuple(self.features.shape)}"
            )
        if not self.lens or min(self.lens) < 1:
            raise ValueError(f"every prompt needs at least one token (its EOS), got lens {list(self.lens)}")

    @classmethod
    def coerce(cls, text: PackedText | Sequence) -> PackedText:
        """A PackedText from itself or from the official tuple (kv_compact, lens[, cu_seqlens, max_len])."""
        if isinstance(text, PackedText):
            return text
        if isinstance(text, (tuple, list)) and len(text) in (2, 4) and isinstance(text[0], torch.Tensor):
            return cls(text[0], tuple(int(n) for n in text[1]))
        raise TypeError("text must be a PackedText or the official (kv_compact, lens, cu_seqlens_k, max_len) tuple")

    @classmethod
    def from_padded(cls, features: torch.Tensor, mask: torch.Tensor) -> PackedText:
        """From padded features (B, Lmax, Ct5) and an attention mask (B, Lmax) whose ones come first."""
        lens = mask.sum(dim=1).tolist()
        return cls(torch.cat([row[:n] for row, n in zip(features, lens, strict=True)]), tuple(lens))

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, rows: slice) -> PackedText:
        """The prompts of a slice of the batch (samplers take prompts in batches)."""
        if not isinstance(rows, slice):
            raise TypeError("index a PackedText with a slice of prompts")
        ends = torch.tensor(self.lens).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        chosen = range(len(self.lens))[rows]
        if not chosen:
            return PackedText(self.features[:0], ())  # raises: an empty batch has no prompt
        return PackedText(torch.cat([self.features[starts[i]: ends[i]] for i in chosen]),
                          tuple(self.lens[i] for i in chosen))

    def cat(self, other: PackedText) -> PackedText:
        """This batch followed by ``other`` (e.g. the unconditional half of a guidance batch)."""
        return PackedText(torch.cat((self.features, other.features)), self.lens + other.lens)


def pad_packed(packed: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
    """(sum(lens), ...) -> (len(lens), max(lens), ...) with zero rows after each sequence (one scatter, no
    per-sequence split: batches of thousands of prompts stay fast)."""
    lengths = torch.tensor(list(lens), device=packed.device)
    present = torch.arange(int(lengths.max()), device=packed.device) < lengths[:, None]  # (R, max(lens))
    padded = packed.new_zeros(len(lengths), present.shape[1], *packed.shape[1:])
    padded[present] = packed
    return padded


@dataclass
class InfinityCondition:
    """Everything the blocks and the head need from the prompts of one batch.

    Rows are the batch's images; with guidance the conditional rows come first, then their unconditional
    copies (R = 2B).  Cross-attention keys/values depend only on the prompt, so each block computes them
    once per condition (:meth:`cross_keys_values`) instead of once per scale.
    """

    pooled: torch.Tensor  # (R, C): the start-token content and the head's AdaLN condition ("cond_BD")
    memory: torch.Tensor  # (sum(lens), C): the projected text tokens, packed
    lens: tuple[int, ...]  # text tokens of each row (R)
    memory_mask: torch.Tensor  # (R, max(lens)) bool: which padded text positions are the row's own tokens
    modulation: torch.Tensor  # (R, 1, 6, C): the shared AdaLN output every block adds its offset to
    batch_size: int  # B, the conditional rows
    # CFG on hidden states (official cfg_insertion_layer k < 0): after block ``mix_layer`` the rows become
    # w_s * cond + (1 - w_s) * uncond, w_s = ``mix_weights[s]`` for a token of scale s (1: left alone)
    mix_layer: int | None = None
    mix_weights: tuple[float, ...] = ()
    _cross_kv: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.pooled.shape[0]

    @property
    def guided(self) -> bool:
        return self.rows == 2 * self.batch_size

    def mix_hidden(self, layer: int, x: torch.Tensor, scale_ids: torch.Tensor) -> torch.Tensor:
        """Hidden-state guidance after block ``layer`` for tokens of scales ``scale_ids`` (n,); x (R, n, C)."""
        if layer != self.mix_layer or not self.guided:
            return x
        weights = x.new_tensor(self.mix_weights)[scale_ids].view(1, -1, 1)  # (1, n, 1)
        batch = self.batch_size
        mixed = torch.where(weights != 1, weights * x[:batch] + (1 - weights) * x[batch:], x[:batch])
        return torch.cat((mixed, torch.where(weights != 1, mixed, x[batch:])))

    def cross_keys_values(self, layer: int, attention: CrossAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (R, heads, max(lens), head_dim) of block ``layer``'s cross-attention, cached."""
        if layer not in self._cross_kv:
            self._cross_kv[layer] = attention.keys_values(self.memory, self.lens)
        return self._cross_kv[layer]


# --------------------------------------------------------------------------------------------------
# layers
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in float32 (the text feature norm)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight).to(x.dtype)


def rope_angles(head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim / 2) of 2-D RoPE for grid positions (L, 2) = (row, col).

    Angle i < head_dim/4 is row * theta_i, the next head_dim/4 are col * theta_i, theta_i =
    10000^(-2i / (head_dim/2)); computed in float32 exactly as the official table.
    """
    half = head_dim // 2
    theta = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (head_dim/4,)
    table = torch.outer(torch.arange(ROPE_MAX_GRID, dtype=torch.int64).float(), theta)  # (128, head_dim/4)
    angles = torch.cat((table[positions[:, 0]], table[positions[:, 1]]), dim=-1)  # (L, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dim pairs (2i, 2i+1) of x (..., n, head_dim) by angle i; float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., n, head_dim/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Cosine attention: l2-normalised q, k, a per-head temperature exp(min(t, ln 100)) on q, scale 1, RoPE."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        self.log_temperature = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        pass_scales: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (R, n, C) of scales first..last; ``pass_scales`` (n,) their scale ids when the pass has several
        scales (block-causal mask; cached keys are visible to all), None for one scale (no mask)."""
        rows, length, width = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(rows, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (R, heads, n, head_dim)
        temperature = self.log_temperature.clamp_max(MAX_LOG_TEMPERATURE).exp()
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = apply_rope(F.normalize(q.float(), dim=-1).mul(temperature), *rope)
            k = apply_rope(F.normalize(k.float(), dim=-1), *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = None
        if pass_scales is not None:
            cached = torch.full((k.shape[2] - length,), -1, device=x.device, dtype=pass_scales.dtype)
            mask = block_causal_mask(pass_scales, torch.cat((cached, pass_scales)))
        out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=mask, scale=1.0)
        if cache is not None:  # the queries and keys exactly as the softmax saw them (normalised, rotated), or
            # the raw projection x W_q (no bias, norm, temperature or RoPE) a cache scoring as the released
            # ScaleKV does asks for
            if getattr(cache, "raw_queries", False):
                q = F.linear(x, self.qkv.weight[:width]).view(rows, length, self.num_heads, -1).transpose(1, 2)
            cache.after_attention(layer, q, k)
        return self.proj(out.transpose(1, 2).reshape(rows, length, width))


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query: the text pool) to each row's own prompt tokens.

    Scale 1/sqrt(head_dim), no key bias.  With ``bf16`` (the official float32 behaviour) q, k, v are rounded
    to bfloat16 and so is the output; the softmax and products stay float32 on CPU (flash on CUDA).
    """

    def __init__(self, width: int, kv_width: int, num_heads: int, pooled: bool = False, bf16: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.bf16 = bf16
        if pooled:
            self.query = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
            nn.init.trunc_normal_(self.query, std=math.sqrt(1 / width / 3))
        else:
            self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width), persistent=False)
        self.proj = nn.Linear(width, width)

    def keys_values(self, text: torch.Tensor, lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed text (sum(lens), kv_width) -> keys, values (R, heads, max(lens), head_dim), zero-padded."""
        kv = F.linear(text, self.kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = pad_packed(kv, lens).unflatten(-1, (2, self.num_heads, self.head_dim))  # (R, Lt, 2, heads, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self, x: torch.Tensor | None, keys_values: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        """x (R, n, C) queries (None: the pool's learned query, n = 1); mask (R, Lt) real text tokens."""
        k, v = keys_values
        rows = k.shape[0]
        if x is None:
            q = self.query.unsqueeze(2).expand(rows, -1, -1, -1).to(k.dtype)  # (R, heads, 1, head_dim)
        else:
            q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        length = q.shape[2]
        emulate = self.bf16 and q.dtype == torch.float32
        if emulate:
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            if q.device.type == "cpu":  # the reference computes in float32 on the rounded values
                q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask[:, None, None, :])
        if emulate:
            out = out.to(torch.bfloat16).float()
        return self.proj(out.transpose(1, 2).reshape(rows, length, -1))


class InfinityBlock(nn.Module):
    """x += g1 * SA(LN(x)(1+s1)+b1); x += CA(LN_affine(x), text); x += g2 * FFN(LN(x)(1+s2)+b2)."""

    def __init__(self, cfg: InfinityConfig, drop_path: float):
        super().__init__()
        width = cfg.width
        self.eps = cfg.norm_eps
        self.attn = SelfAttention(width, cfg.num_heads)
        self.cross_norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(width, width, cfg.num_heads, bf16=cfg.cross_attn_bf16)
        self.ffn = FeedForward(width, cfg.ffn_hidden, 0.0)
        self.modulation_offset = nn.Parameter(torch.randn(1, 1, 6, width) / math.sqrt(width))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).mul(scale.add(1)).add_(shift)

    def forward(
        self,
        x: torch.Tensor,
        cond: InfinityCondition,
        layer: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        pass_scales: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.modulation_offset + cond.modulation).unbind(2)
        attended = self.attn(self.modulate(x, scale1, shift1), rope, pass_scales, cache, layer)
        x = x + self.drop_path(attended.mul_(gamma1))
        text = cond.cross_keys_values(layer, self.cross_attn)
        x = x + self.cross_attn(self.cross_norm(x), text, cond.memory_mask).float()
        return x + self.drop_path(self.ffn(self.modulate(x, scale2, shift2)).mul(gamma2))


# --------------------------------------------------------------------------------------------------
# the model
AfterLayer = Callable[[int, torch.Tensor], torch.Tensor]


class Infinity(nn.Module):
    """Text-conditional bitwise next-scale-prediction transformer.

    Inputs of scales 1.. are the tokenizer's next-scale features (B, h*w, d) embedded by ``word_embed``;
    scale 0 is the start token ``pooled + pos_start``.  ``null_text`` is the learned empty prompt
    (``cfg_uncond``): the unconditional half of guidance uses its first len_i rows for prompt i.

    It is a :class:`~var.models.family.ScaleModel`: conditions are prompts (:class:`PackedText` T5 features),
    a token is ``bits_per_token`` two-way draws, and ``schedule`` (default: square 1M, 1024 px) is the one
    samplers decode, chosen with :meth:`use_schedule` (schedules are not part of the weights).
    """

    sampling_rule = "infinity"
    raw_query_scoring = True  # attention hands a cache with ``raw_queries`` x W_q (ScaleKV's released scoring)

    def __init__(self, cfg: InfinityConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or InfinityConfig(**overrides)
        self.config = cfg
        width, text_channels = cfg.width, cfg.text_channels
        init_std = math.sqrt(1 / width / 3)

        self.null_text = nn.Parameter(torch.empty(cfg.text_maxlen, text_channels))
        if self.null_text.device.type != "meta":  # the official empty text: a fixed draw, seed 0 on CPU
            generator = torch.Generator("cpu").manual_seed(0)
            null_text = nn.init.trunc_normal_(torch.empty(cfg.text_maxlen, text_channels), std=1.2, generator=generator)
            with torch.no_grad():
                self.null_text.copy_(null_text / math.sqrt(text_channels))
        self.text_norm = RMSNorm(text_channels, cfg.norm_eps)
        self.text_pool = CrossAttention(
            width, text_channels, cfg.text_pool_heads, pooled=True, bf16=cfg.cross_attn_bf16
        )
        self.text_proj = nn.Sequential(
            nn.Linear(text_channels, width), nn.GELU(approximate="tanh"), nn.Linear(width, width)
        )
        self.pos_start = nn.Parameter(torch.empty(1, 1, width))
        self.level_embed = nn.Embedding(cfg.num_levels, width)
        for tensor in (self.pos_start, self.level_embed.weight):
            nn.init.trunc_normal_(tensor, std=init_std)
        self.word_embed = nn.Linear(cfg.bits_per_token, width)
        self.shared_modulation = nn.Linear(width, 6 * width)
        drop_paths = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([InfinityBlock(cfg, drop_paths[i]) for i in range(cfg.depth)])
        self.head_norm = AdaLNHead(width, 2 * cfg.bits_per_token, cfg.norm_eps)
        self.head = nn.Linear(width, 2 * cfg.bits_per_token)
        self._rope: dict[tuple[ScaleSchedule, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.schedule = schedule_for(1.0, "1M")

    # -- the scale-model protocol (var/models/family.py) -----------------------------------------------------
    def use_schedule(self, schedule: ScaleSchedule | Sequence[Sequence[int]]) -> Infinity:
        """Decode ``schedule`` (an official one, or a prefix of a template) from now on; returns the model."""
        schedule = resolve_schedule(schedule)
        if schedule.num_scales > self.config.num_levels:
            raise ValueError(f"the schedule has {schedule.num_scales} scales but the level embedding has "
                             f"{self.config.num_levels} rows")
        self.schedule = schedule
        return self

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def vocab_size(self) -> int:
        return 2  # one bit

    @property
    def draws_per_token(self) -> int:
        return self.config.bits_per_token

    def resolve_conditions(self, conditions, batch_size: int | None = None,
                           generator: torch.Generator | None = None) -> PackedText:
        """Prompts as T5 features (:class:`PackedText` or the official tuple) on the model's device."""
        if conditions is None:
            raise ValueError("Infinity is text-to-image: give prompts (var sample --prompt 'a cat'), or T5 features "
                             "as a PackedText")
        text = PackedText.coerce(conditions)
        if batch_size is not None and batch_size != text.batch_size:
            raise ValueError(f"batch_size {batch_size} but {text.batch_size} prompts were given")
        device = self.null_text.device
        return PackedText(text.features.to(device), text.lens)

    def condition_batch_size(self, conditions: PackedText) -> int:
        return conditions.batch_size

    def check_tokenizer(self, tokenizer) -> None:
        bits = getattr(tokenizer, "bits_per_token", None)
        if bits != self.config.bits_per_token:
            raise ValueError(
                f"this Infinity reads {self.config.bits_per_token}-bit tokens but the tokenizer "
                f"({type(tokenizer).__name__}) gives {bits}: pair it with its own BSQ tokenizer (Infinity-8B: the "
                "stride-8 tokenizer with spatial patchify)"
            )

    @torch.no_grad()
    def init_weights(
        self, init_std: float | None = None, aln_init: float = 1e-3, aln_gamma_init: float = 1e-3,
        head_scale: float = 0.02,
    ) -> None:
        """The official training initialisation (spec_infinity.md 3.7): truncated-normal linears and
        embeddings, tiny AdaLN gates/scales/shifts and head, residual projections scaled by 1/sqrt(2 depth)."""
        std = math.sqrt(1 / self.config.width / 3) if init_std is None else init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.head_norm.modulation.weight.mul_(aln_init)
        self.head_norm.modulation.bias.zero_()
        self.head.weight.mul_(head_scale)
        self.head.bias.zero_()
        for block in self.blocks:
            for linear in (block.attn.proj, block.cross_attn.proj, block.ffn.fc2):
                linear.weight.div_(math.sqrt(2 * self.config.depth))
            block.modulation_offset[:, :, :2].mul_(aln_gamma_init)
            block.modulation_offset[:, :, 2:].mul_(aln_init)

    def set_cross_attention_bf16(self, enabled: bool) -> None:
        """Switch the official bf16 rounding of cross-attention (and the text pool) on or off."""
        self.config.cross_attn_bf16 = enabled
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.bf16 = enabled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- conditions ---------------------------------------------------------------------------------------
    def null_text_for(self, lens: Sequence[int]) -> PackedText:
        """The empty prompt for prompts of these lengths: null_text[:len_i] each (length kept)."""
        longest = max(lens)
        if longest > self.config.text_maxlen:
            raise ValueError(
                f"a prompt has {longest} T5 tokens but this model's empty text has {self.config.text_maxlen} rows "
                f"(text_maxlen): shorten the prompt to {self.config.text_maxlen} tokens"
            )
        return PackedText(torch.cat([self.null_text[:n] for n in lens]), tuple(lens))

    def drop_text(self, text: PackedText) -> PackedText:
        """Classifier-free-guidance training: in train mode each prompt becomes the empty text with probability
        ``cond_drop_rate``.  (The official model drops prompts in eval mode too, and in place; we do neither.)"""
        if not self.training or self.config.cond_drop_rate <= 0:
            return text
        drop = (torch.rand(text.batch_size) < self.config.cond_drop_rate).tolist()
        null = self.null_text_for(text.lens).features
        parts, begin = [], 0
        for n, dropped in zip(text.lens, drop, strict=True):
            parts.append((null if dropped else text.features)[begin: begin + n])
            begin += n
        return PackedText(torch.cat(parts), text.lens)

    def condition(
        self, text: PackedText | Sequence, guidance: bool = False, negative: PackedText | Sequence | None = None
    ) -> InfinityCondition:
        """Pooled text, text memory and shared AdaLN of a batch of prompts.

        Args:
            text: T5 features of B prompts, packed (:class:`PackedText` or the official tuple).
            guidance: stack the unconditional half after the conditional one (2B rows): prompt i's features
                replaced by ``null_text[:len_i]``, or by ``negative`` prompts when given.
        """
        text = PackedText.coerce(text)
        if text.features.shape[1] != self.config.text_channels:
            raise ValueError(
                f"text features have {text.features.shape[1]} channels but this model reads "
                f"{self.config.text_channels} (flan-t5-xl gives 2048)"
            )
        batch = text.batch_size
        if guidance:
            uncond = self.null_text_for(text.lens) if negative is None else PackedText.coerce(negative)
            if uncond.batch_size != batch:
                raise ValueError(f"{uncond.batch_size} negative prompts for {batch} prompts; give one per prompt")
            text = text.cat(uncond)
        with torch.autocast(device_type=text.features.device.type, enabled=False):
            features = self.text_norm(text.features.float())  # (sum(lens), Ct5)
            lens = torch.tensor(text.lens, device=features.device)
            mask = torch.arange(max(text.lens), device=features.device) < lens[:, None]  # (R, max(lens))
            pooled = self.text_pool(None, self.text_pool.keys_values(features, text.lens), mask)[:, 0].float()
            memory = self.text_proj(features)  # (sum(lens), C)
            modulation = self.shared_modulation(F.silu(pooled)).view(-1, 1, 6, self.config.width)
        return InfinityCondition(pooled, memory, text.lens, mask, modulation, batch)

    # -- the scale-wise forward -----------------------------------------------------------------------
    def rope_for(
        self, schedule: ScaleSchedule, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin) (L, head_dim/2) of every token of the schedule and each token's scale id (L,), cached."""
        key = (schedule, str(device))
        if key not in self._rope:
            if schedule.num_scales > self.config.num_levels:
                raise ValueError(
                    f"the schedule has {schedule.num_scales} scales but the level embedding has "
                    f"{self.config.num_levels} rows"
                )
            cos, sin = rope_angles(self.config.head_dim, rope_positions(schedule))
            scale_ids = torch.cat([torch.full((n,), si) for si, n in enumerate(schedule.tokens)])
            self._rope[key] = (cos.to(device), sin.to(device), scale_ids.to(device))
        return self._rope[key]

    def input_tokens(
        self,
        cond: InfinityCondition,
        inputs: torch.Tensor | None,
        schedule: ScaleSchedule,
        first: int,
        last: int,
    ) -> torch.Tensor:
        """Embedded tokens (R, n, C) of scales first..last: [start token ;] word_embed(inputs), + level embedding.

        ``inputs`` (B or R, n', bits_per_token) are the next-scale features of the scales after 0 in the
        range (None when the range is scale 0 alone); B rows are repeated for the guidance half.
        """
        rows = cond.rows
        parts = []
        if first == 0:
            parts.append(cond.pooled.unsqueeze(1) + self.pos_start)  # (R, 1, C)
        if inputs is not None and inputs.shape[1] > 0:
            if inputs.shape[0] != rows:
                if rows % inputs.shape[0]:
                    raise ValueError(f"inputs have {inputs.shape[0]} rows but the condition has {rows}")
                inputs = inputs.repeat(rows // inputs.shape[0], 1, 1)
            parts.append(self.word_embed(inputs.float()))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        begin, end = schedule.bounds[first][0], schedule.bounds[last][1]
        if x.shape[1] != end - begin:
            raise ValueError(
                f"scales {first}..{last} have {end - begin} tokens but {x.shape[1]} were given "
                "(inputs hold the features of every scale after 0 in the range)"
            )
        _, _, scale_ids = self.rope_for(schedule, x.device)
        return x + self.level_embed(scale_ids[begin:end])

    def forward_scales(
        self,
        cond: InfinityCondition,
        first: int,
        last: int | None = None,
        inputs: torch.Tensor | None = None,
        cache: KVCache | None = None,
        schedule: ScaleSchedule | Sequence[Sequence[int]] | None = None,
        after_layer: AfterLayer | None = None,
    ) -> torch.Tensor:
        """One pass over scales first..last (default: first alone) of ``schedule`` (default: the model's) on
        top of the cached scales < first.

        Tokens attend block-causally inside the pass and to everything in ``cache`` (whose keys/values the
        pass appends; the caller announces the pass with ``cache.begin_pass``).  RoPE uses the positions of
        these scales in the schedule, so a cached pass equals the matching slice of a full pass.
        After each block the condition's hidden-state guidance applies (:meth:`InfinityCondition.mix_hidden`),
        then ``after_layer(layer, x)``, which may replace the hidden state (tests, probes).
        Returns hidden states (R, n_first + ... + n_last, C).
        """
        schedule = self.schedule if schedule is None else resolve_schedule(schedule)
        last = first if last is None else last
        if not 0 <= first <= last < schedule.num_scales:
            raise ValueError(f"scales {first}..{last} are outside the {schedule.num_scales}-scale schedule")
        x = self.input_tokens(cond, inputs, schedule, first, last)
        cos, sin, scale_ids = self.rope_for(schedule, x.device)
        begin, end = schedule.bounds[first][0], schedule.bounds[last][1]
        rope = (cos[begin:end], sin[begin:end])
        pass_scales = scale_ids[begin:end] if last > first else None
        for layer, block in enumerate(self.blocks):
            x = block(x, cond, layer, rope, pass_scales, cache)
            x = cond.mix_hidden(layer, x, scale_ids[begin:end])
            if after_layer is not None:
                x = after_layer(layer, x)
        return x

    def head_logits(self, hidden: torch.Tensor, cond: InfinityCondition) -> torch.Tensor:
        """Head output (rows, n, 2d) in float32; rows may be the first B of the condition (guided hidden)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            pooled = cond.pooled[: hidden.shape[0]].float()
            return self.head(self.head_norm(hidden.float(), pooled)).float()

    def logits(self, hidden: torch.Tensor, cond: InfinityCondition) -> torch.Tensor:
        """Bit logits (rows, n * d, 2): the protocol's draws (:func:`bit_logits` of :meth:`head_logits`)."""
        return bit_logits(self.head_logits(hidden, cond))

    def forward(
        self,
        text: PackedText | Sequence,
        inputs: torch.Tensor,
        schedule: ScaleSchedule | Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Teacher-forced pass: logits (B, L, 2d) for every token of every scale.

        ``inputs`` (B, L - 1, d) come from :meth:`BSQTokenizer.teacher_forcing_input`; in train mode prompts
        are dropped to the empty text with probability ``cond_drop_rate``.
        """
        schedule = resolve_schedule(schedule)
        cond = self.condition(self.drop_text(PackedText.coerce(text)))
        hidden = self.forward_scales(cond, 0, schedule.num_scales - 1, inputs, schedule=schedule)
        return self.head_logits(hidden, cond)


def bit_logits(logits: torch.Tensor) -> torch.Tensor:
    """(R, n, 2d) -> (R, n*d, 2): row (token t, bit j) holds the logits of bit j of token t being 0 and 1."""
    return logits.reshape(logits.shape[0], -1, 2)


def build_infinity(size: str = "infinity_2b", **overrides) -> Infinity:
    """An Infinity of a named official size with the official initialisation (random weights)."""
    if size not in INFINITY_SIZES:
        raise ValueError(f"unknown Infinity size {size!r}; choose one of {', '.join(INFINITY_SIZES)}")
    init_args = {k: overrides.pop(k) for k in list(overrides) if k in ("init_std", "aln_init", "aln_gamma_init",
                                                                       "head_scale")}
    model = Infinity(InfinityConfig(**{**INFINITY_SIZES[size], **overrides}))
    model.init_weights(**init_args)
    return model
