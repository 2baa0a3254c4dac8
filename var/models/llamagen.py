"""LlamaGen: a Llama-style GPT over raster-order VQ tokens, class- (c2i) or text-conditioned (t2i).

Written from ``shared/reference/spec_llamagen.md``; parameter names follow the official checkpoints
(``layers.3.attention.wqkv.weight`` ...), so released files load key for key (var/checkpoints_llamagen.py).

Sequence layout: ``cls_token_num`` (T) condition rows, then the image tokens in raster order.  Position p of
the sequence has absolute position p; the hidden state at position T-1+j predicts image token j.

* c2i: one condition row, the embedding of the class label (label ``num_classes`` is the null class);
* t2i: T caption rows, a 2-layer MLP of T5 features; the null caption is the ``uncond_embedding`` buffer.

Blocks are pre-norm: RMSNorm -> attention (fused wqkv, 2-D RoPE) and RMSNorm -> SwiGLU.  There are no learned
positions: the weights do not depend on the image size, only the RoPE grid (``block_size``) does.

Two ways to run it:

* :meth:`LlamaGen.forward` (teacher forcing): the whole sequence at once, logits for every position;
* :meth:`LlamaGen.forward_hidden` with a cache object: k >= 1 new rows at explicit absolute positions per row,
  causal among themselves, on top of the cached prefix; :meth:`LlamaGen.forward_positions` is the same for the
  samplers (the :class:`~var.models.family.RasterModel` protocol, with :class:`Captions` for t2i).
  :meth:`prefill` and :meth:`step` wrap it for
  condition rows and image tokens.  The cache speaks var/models/kv_cache.py's interface
  (``update(layer, k, v) -> (keys, values)``, optional ``after_attention(layer, q, k)``) and must keep
  slot s = absolute position s, which :class:`~var.models.kv_cache.KVCache` (filled from position 0) and
  :class:`~var.models.kv_cache.RaggedKVCache` both do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from var.models.family import resolve_labels
from var.pretrained import PretrainedMixin

MODEL_TYPES = ("c2i", "t2i")


@dataclass
class LlamaGenConfig:
    """Every constructor argument of :class:`LlamaGen` (the official ``ModelArgs`` less its unused fields)."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None: n_head (no grouped-query attention; no released model uses it)
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: int = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000  # c2i; the label table has num_classes + 1 rows (the last is the null class)
    caption_dim: int = 2048  # t2i: T5 feature width (flan-t5-xl)
    class_dropout_prob: float = 0.1  # training: probability that a row's condition becomes the null one
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1  # T: condition rows before the image tokens (c2i: 1; t2i: caption tokens, 120)
    block_size: int = 256  # image tokens (a square grid: 256 = 16x16 for 256 px with VQ-16)

    def __post_init__(self) -> None:
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.dim % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(
                f"dim {self.dim} must divide into n_head {self.n_head} heads, and n_head into n_kv_head "
                f"{self.n_kv_head} groups"
            )
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head_dim divisible by 4, got {self.head_dim} (dim / n_head)")
        if self.grid_size ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square token grid (e.g. 256 = 16x16)")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError(f"c2i models have one condition row (cls_token_num=1), got {self.cls_token_num}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        """Side of the image token grid."""
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width: floor(2/3 * 4 dim), times ffn_dim_multiplier (floored), rounded UP to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def seq_len(self) -> int:
        """Condition rows plus image tokens."""
        return self.cls_token_num + self.block_size

    def to_dict(self) -> dict:
        return asdict(self)


# The named sizes (DiT-style registry): n_layer / n_head / dim.
LLAMAGEN_SIZES: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),  # 1.2B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),  # 6.6B
}


def llamagen_config(size: str, **overrides) -> LlamaGenConfig:
    """The config of a named size (``"GPT-B"`` ... ``"GPT-7B"``) with any field overridden."""
    if size not in LLAMAGEN_SIZES:
        raise ValueError(f"unknown LlamaGen size {size!r}; choose one of {', '.join(LLAMAGEN_SIZES)}")
    return LlamaGenConfig(**{**LLAMAGEN_SIZES[size], **overrides})


# --------------------------------------------------------------------------------------------------
# building blocks
class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back to the input dtype BEFORE the gain."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_2d(positions: torch.Tensor, cfg: LlamaGenConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., n, 1, head_dim / 2) of the 2-D rotary embedding at absolute ``positions`` (..., n).

    Image token t = position - T sits at (row, col) = divmod(t, grid).  Each axis has head_dim / 4 frequencies
    base^(-2k / (head_dim / 2)); the first half of the rotary pairs turns by row * f, the second half by
    col * f.  Condition positions (< T) get cos = sin = 0: their queries and keys become zero vectors.
    """
    quarter = cfg.head_dim // 4
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2, device=positions.device)[:quarter].float() / half))
    token = positions - cfg.cls_token_num
    row = torch.div(token, cfg.grid_size, rounding_mode="floor").float()
    col = torch.remainder(token, cfg.grid_size).float()
    angles = torch.cat((row.unsqueeze(-1) * freqs, col.unsqueeze(-1) * freqs), dim=-1)  # (..., n, half)
    is_image = (token >= 0).unsqueeze(-1)
    cos = torch.where(is_image, angles.cos(), 0.0).unsqueeze(-2)
    sin = torch.where(is_image, angles.sin(), 0.0).unsqueeze(-2)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2p], x[2p+1]) of x (B, n, heads, head_dim) in float32; same dtype out."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, n, heads, head_dim / 2)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention_mask(positions: torch.Tensor, num_keys: int, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask (B, 1, n, num_keys), True = may attend, for queries at ``positions`` (B, n).

    Key slot s holds absolute position s: a query at position p sees slots <= p (the official absolute-position
    triangle; it is also causal among new rows).  With a t2i ``text_mask`` (B, T) (1 = real caption token,
    left padded), padded caption slots are hidden from every query, but each query keeps its own slot, so a
    padded caption row attends to itself rather than to nothing (spec 4.3).  With classifier-free guidance the
    same text mask applies to the unconditional half.
    """
    keys = torch.arange(num_keys, device=positions.device)
    mask = keys <= positions.unsqueeze(-1)  # (B, n, num_keys)
    if text_mask is not None:
        visible = F.pad(text_mask.bool(), (0, num_keys - text_mask.shape[1]), value=True)  # (B, num_keys)
        mask = (mask & visible.unsqueeze(1)) | (keys == positions.unsqueeze(-1))
    return mask.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows q, k, v) and 2-D RoPE on q and k."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.split = (cfg.dim, kv_dim, kv_dim)
        self.wqkv = nn.Linear(cfg.dim, cfg.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache=None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = apply_rope(q.view(batch, length, self.n_head, self.head_dim), *rope)
        k = apply_rope(k.view(batch, length, self.n_kv_head, self.head_dim), *rope)
        v = v.view(batch, length, self.n_kv_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, n, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # every key/value the new rows attend to
        if self.n_kv_head != self.n_head:  # head i uses kv head i // group
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and cache is None,  # teacher forcing without a mask: plain causal
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        if cache is not None and hasattr(cache, "after_attention"):  # queries as the softmax sees them
            cache.after_attention(layer, q * self.head_dim ** -0.5, k)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, length, dim)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: LlamaGenConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, rope, mask, cache=None, layer: int = 0) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, mask, cache, layer))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class label (B,) -> one condition row (B, 1, dim); label ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)


class CaptionProjection(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear, no biases."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """T5 caption features (B, T, caption_dim) -> condition rows (B, T, dim).

    ``uncond_embedding`` (T, caption_dim) is the null caption; it is a buffer (saved in the state dict, never
    trained), initialised N(0, 1) / sqrt(caption_dim).  The official class always makes it 120 rows, which is
    the T of every released t2i model (and guidance needs captions of exactly its length), so here T = 120 is
    not hard-wired but taken from ``cls_token_num``.
    """

    def __init__(self, caption_dim: int, dim: int, caption_tokens: int):
        super().__init__()
        self.register_buffer("uncond_embedding", torch.randn(caption_tokens, caption_dim) / caption_dim ** 0.5)
        self.cap_proj = CaptionProjection(caption_dim, dim)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(captions)


@dataclass
class Captions:
    """A batch of t2i conditions: T5 caption features (B, T, caption_dim), left padded as LlamaGen's
    ``sample_t2i.py`` does (var.text ``encode_llamagen``), and their mask (B, T), 1 = real token; ``mask``
    None means every token is real (no padding mask, the official ``emb_masks=None``)."""

    features: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index) -> Captions:
        """A sub-batch (``captions[i:j]``), as label tensors are sliced into sampling batches."""
        return Captions(self.features[index], None if self.mask is None else self.mask[index])


@dataclass
class ConditionRows:
    """What the samplers' condition object is for LlamaGen: the embedded condition rows (rows, T, dim) of every
    batch row (the batch, then, when guided, its null copy) and the caption padding mask (rows, T) (t2i)."""

    rows: torch.Tensor
    text_mask: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# the model
class LlamaGen(PretrainedMixin, nn.Module):
    """The LlamaGen GPT (one class for c2i and t2i; ``config.model_type`` says which).

    Conditions are passed raw: class labels (B,) int64 for c2i, caption features (B, T, caption_dim) for t2i.
    It is a :class:`~var.models.family.RasterModel` (sampling rule ``"llamagen"``, var/sample/rules.py), so
    the raster samplers (``ar``, ``sjd``) run on it; it is also the raster model ``var train --model ar``
    trains on our tokenizers.
    """

    sampling_rule = "llamagen"
    hub_role = "transformer"

    def __init__(self, cfg: LlamaGenConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or LlamaGenConfig(**overrides)
        self.config = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        drop_paths = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList([TransformerBlock(cfg, rate) for rate in drop_paths])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: Linear and Embedding weights N(0, initializer_range), output head zero,
        RMSNorm gains 1 (``uncond_embedding``, a buffer, keeps its constructor draw)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.output.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- conditions ------------------------------------------------------------------------------------
    def check_condition(self, cond: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when ``cond`` is not this model's kind of condition."""
        cfg = self.config
        if cfg.model_type == "c2i":
            if cond.ndim != 1 or cond.dtype.is_floating_point:
                raise ValueError(f"a c2i LlamaGen takes class labels (B,) int64, got {cond.dtype} {tuple(cond.shape)}")
            bad = (cond < 0) | (cond > cfg.num_classes)
            if bool(bad.any()):
                raise ValueError(
                    f"label {int(cond[bad][0])} is out of range: this model has {cfg.num_classes} classes "
                    f"(0..{cfg.num_classes - 1}; {cfg.num_classes} is the null class)"
                )
        elif cond.ndim != 3 or tuple(cond.shape[1:]) != (cfg.cls_token_num, cfg.caption_dim):
            raise ValueError(
                f"a t2i LlamaGen takes caption features (B, {cfg.cls_token_num}, {cfg.caption_dim}), got "
                f"{tuple(cond.shape)}; encode prompts with var.text (LlamaGen flavour: left padded, "
                f"{cfg.cls_token_num} tokens)"
            )

    def null_condition(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The classifier-free-guidance null condition for ``batch`` rows: the null class (c2i) or the
        ``uncond_embedding`` caption (t2i), in the raw form :meth:`condition` takes."""
        cfg = self.config
        device = device or self.tok_embeddings.weight.device
        if cfg.model_type == "c2i":
            return torch.full((batch,), cfg.num_classes, dtype=torch.long, device=device)
        return self.cls_embedding.uncond_embedding.expand(batch, -1, -1).to(device)

    def drop_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Training: each row's condition becomes the null one with probability ``class_dropout_prob``."""
        drop = torch.rand(cond.shape[0], device=cond.device) < self.config.class_dropout_prob
        null = self.null_condition(cond.shape[0], cond.device).to(cond.dtype)
        return torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), null, cond)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image token ids (B, n) -> rows (B, n, dim)."""
        return self.tok_embeddings(tokens)

    # -- transformer -----------------------------------------------------------------------------------
    def forward_hidden(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Run the blocks on embedded rows x (B, n, dim) at absolute ``positions`` ((n,) or (B, n) int64).

        Without a cache the rows are the whole sequence: ``mask`` (B or 1, 1, n, n) bool, or None for plain
        causal attention.  With a cache they are new rows: their keys/values are written into the cache, and
        they attend to the cached prefix and causally among themselves.  ``mask`` (B, 1, n, cached keys) is
        then the caller's (ragged windows, t2i padding: :func:`attention_mask`); None builds the absolute-
        position triangle from ``positions`` (slot s = position s), which one new row does not need.
        Returns the final-normalised hidden states (B, n, dim).
        """
        if positions.ndim == 1:
            positions = positions.unsqueeze(0)
        rope = rope_2d(positions, self.config)
        if mask is None and cache is not None and x.shape[1] > 1:
            mask = attention_mask(positions, int(positions.max()) + 1)
        h = self.tok_dropout(x)
        for layer, block in enumerate(self.layers):
            h = block(h, rope, mask, cache, layer)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor, cond: ConditionRows | None = None) -> torch.Tensor:
        """Vocabulary logits (B, n, V) in float32 from :meth:`forward_hidden`'s output (``cond`` unused: the
        :class:`~var.models.family.RasterModel` signature)."""
        return self.output(hidden).float()

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T + n, V) for EVERY position of [condition rows; ``tokens`` (B, n)].

        Row T-1+j predicts image token j, so feeding ``tokens[:, :-1]`` of a full token map gives the predictions
        of all its tokens at rows T-1 .. T+L-2 (training takes ``logits[:, T - 1:]``).  In training mode the
        condition is dropped to the null one with probability ``class_dropout_prob``.  ``mask``: None (causal)
        or a boolean (B, 1, T+n, T+n) mask, e.g. :func:`attention_mask` with a t2i caption mask.
        """
        if self.training:
            cond = self.drop_condition(cond)
        x = torch.cat((self.condition_rows(cond), self.embed_tokens(tokens)), dim=1)
        positions = torch.arange(x.shape[1], device=x.device)
        return self.logits(self.forward_hidden(x, positions, mask))

    def prefill(self, cond: torch.Tensor, cache, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Write the condition rows (positions 0..T-1) into ``cache``; logits (B, T, V), the last row predicts
        image token 0.  ``mask``: as for :meth:`forward_hidden` (t2i: the caption padding mask)."""
        x = self.condition_rows(cond)
        positions = torch.arange(x.shape[1], device=x.device)
        return self.logits(self.forward_hidden(x, positions, mask, cache))

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed image tokens (B, k) at absolute ``positions`` (B, k) (token j sits at T + j) on top of the
        cache; logits (B, k, V): row i predicts the token after ``tokens[:, i]``."""
        return self.logits(self.forward_hidden(self.embed_tokens(tokens), positions, mask, cache))

    # -- the RasterModel protocol (var/models/family.py): what the raster samplers use ------------------------
    @property
    def depth(self) -> int:
        return self.config.n_layer

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid_size, self.config.grid_size

    def resolve_conditions(self, conditions, batch_size: int | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor | Captions:
        """c2i: class labels (B,) (-1 = unconditional, None = ``batch_size`` random ones).  t2i: a
        :class:`Captions`, a (features, mask) pair or the features alone (B, T, caption_dim)."""
        device = self.tok_embeddings.weight.device
        if self.config.model_type == "c2i":
            return resolve_labels(conditions, self.config.num_classes, device, batch_size, generator)
        if conditions is None:
            raise ValueError("a text-to-image LlamaGen needs captions: pass prompts (--prompt / --prompts), "
                             "encoded with var.text.T5TextEncoder.encode_llamagen")
        if isinstance(conditions, torch.Tensor):
            conditions = Captions(conditions)
        elif isinstance(conditions, (tuple, list)):
            conditions = Captions(*conditions)
        self.check_condition(conditions.features)
        mask = conditions.mask
        if mask is not None and tuple(mask.shape) != tuple(conditions.features.shape[:2]):
            raise ValueError(f"caption mask {tuple(mask.shape)} does not match the features "
                             f"{tuple(conditions.features.shape)}: one entry per caption token")
        return Captions(conditions.features.to(device), None if mask is None else mask.to(device))

    def condition_batch_size(self, conditions: torch.Tensor | Captions) -> int:
        return len(conditions)

    def condition(self, conditions: torch.Tensor | Captions, guided: bool) -> ConditionRows:
        """Condition rows of the batch, then (``guided``) of the null condition: the official CFG batch
        [cond; uncond]; a caption mask applies to both halves (spec 4.3)."""
        if self.config.model_type == "c2i":
            cond, mask = conditions, None
        else:
            cond, mask = conditions.features, conditions.mask
        if guided:
            cond = torch.cat((cond, self.null_condition(len(cond), cond.device).to(cond.dtype)))
            mask = None if mask is None else mask.repeat(2, 1)
        return ConditionRows(self.condition_rows(cond), mask)

    def condition_rows(self, cond: torch.Tensor) -> torch.Tensor:
        """Embedded condition rows (B, T, dim) of raw conditions (labels or caption features)."""
        self.check_condition(cond)
        if self.config.model_type == "t2i":
            cond = cond.to(self.cls_embedding.cap_proj.fc1.weight.dtype)
        return self.cls_embedding(cond)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a ValueError when ``tokenizer`` (LlamaGen's VQ, or our VQ-VAE read as one scale) cannot decode
        this model's token maps."""
        config = tokenizer.config
        vocab = getattr(config, "codebook_size", None) or getattr(config, "vocab_size", None)
        problems = []
        if vocab != self.config.vocab_size:
            problems.append(f"tokenizer vocabulary {vocab} vs the GPT's vocab_size {self.config.vocab_size}")
        patch_nums = getattr(tokenizer, "patch_nums", None)
        if patch_nums and patch_nums[-1] != self.config.grid_size:
            problems.append(f"latent side {patch_nums[-1]} vs the GPT's token grid {self.config.grid_size}")
        if problems:
            raise ValueError("tokenizer and transformer do not match: " + "; ".join(problems))

    def condition_length(self, cond: ConditionRows) -> int:
        return cond.rows.shape[1]

    def forward_positions(self, cond: ConditionRows, tokens: torch.Tensor, positions: torch.Tensor, cache,
                          attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (rows, n, dim) of inputs at absolute ``positions`` (rows, n) over ``cache`` (slot s =
        position s): condition row p where p < T, else the embedding of ``tokens``.  ``attn_mask`` (rows, 1, n,
        keys) or None (one new row, or the absolute triangle); the caption padding mask is added here."""
        length = cond.rows.shape[1]
        index = positions.clamp(max=length - 1).unsqueeze(-1).expand(-1, -1, cond.rows.shape[-1])
        x = torch.where((positions < length).unsqueeze(-1), cond.rows.gather(1, index),
                        self.embed_tokens(tokens).to(cond.rows.dtype))
        if cond.text_mask is not None:
            keys = attn_mask.shape[-1] if attn_mask is not None else int(positions.max()) + 1
            padded = attention_mask(positions, keys, cond.text_mask)
            attn_mask = padded if attn_mask is None else attn_mask & padded
        return self.forward_hidden(x, positions, attn_mask, cache)


def build_llamagen(size: str, **overrides) -> LlamaGen:
    """A randomly initialised LlamaGen of a named size, e.g. ``build_llamagen("GPT-B", vocab_size=16384)``."""
    return LlamaGen(llamagen_config(size, **overrides))
