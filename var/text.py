"""The text encoder of text-conditioned models: the flan-t5-xl encoder through ``transformers``.

Weights come from the local Hugging Face cache only (or a local folder): nothing is downloaded at run time.
Without them, :class:`T5TextEncoder` stops before any model work with one line naming the model id and where
the files go.

Two flavours of the same encoder:

* LlamaGen t2i (:meth:`T5TextEncoder.encode_llamagen`): captions cleaned twice with the DeepFloyd/PixArt
  caption cleaning (:func:`clean_caption`), 120 tokens (padded to 120, truncated), then *left* padded: each
  caption's real tokens moved to the end, the mask flipped and padding rows zeroed (:func:`left_pad`).
  The official script runs T5 in bfloat16 (our default).
* Infinity (:meth:`T5TextEncoder.encode_infinity`): the raw prompt, 512 tokens, float16 encoder, the real rows
  of every prompt packed into one (sum L_i, 2048) tensor with their lengths
  (:class:`~var.models.infinity.PackedText`, what the Infinity model and samplers take).

Features are returned in float32 (an exact copy of the encoder's bf16/fp16 output).
"""

from __future__ import annotations

import html
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import torch

from var.models.infinity import PackedText

FLAN_T5_XL = "google/flan-t5-xl"
LLAMAGEN_MAX_LENGTH = 120
INFINITY_MAX_LENGTH = 512


# --------------------------------------------------------------------------------------------------
# caption cleaning (LlamaGen t2i)
class _TextOnly(HTMLParser):
    """Collects the text of an HTML fragment (tags dropped, character references resolved)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _split_dashed_words(text: str) -> str:
    """this-is-my-cute-cat / this_is_my_cute_cat -> spaces, when there are more than three - or _."""
    return re.sub(r"[-_]", " ", text) if len(re.findall(r"[-_]", text)) > 3 else text


def _basic_clean(text: str) -> str:
    """Unicode NFC (ftfy's normalisation; its mojibake repair is not reproduced) and HTML entities, twice."""
    return html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()


_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_DOMAIN = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_BAD_PUNCTUATION = r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+"
_DASHES = (
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
    r"\uFE58\uFE63\uFF0D]+"
)

# The DeepFloyd IF / PixArt caption cleaning that LlamaGen applies (twice) before T5, in order: a rule is a
# (pattern, replacement) pair or a function of the text.  Runs after unquote_plus + strip + lower.
_CAPTION_RULES = (
    (r"<person>", "person"),
    (rf"\b((?:https?:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_DOMAIN}))", ""),  # urls
    (rf"\b((?:www:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_DOMAIN}))", ""),
    _html_text,  # html tags
    (r"@[\w\d]+\b", ""),  # @nickname
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes .. CJK unified ideographs (seven contiguous blocks)
    (_DASHES, "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),  # quotes to one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.(?:{_FILE_TYPES})", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"[.]{2,}", " "),
    (_BAD_PUNCTUATION, " "),
    (r"\s+\.\s+", " "),
    _split_dashed_words,
    _basic_clean,
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_TYPES})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes 1920x1080 (latin x, cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # surrounding quotes (the text is not stripped before this)
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
)
_COMPILED_RULES = tuple(rule if callable(rule) else (re.compile(rule[0]), rule[1]) for rule in _CAPTION_RULES)


def clean_caption(caption: str) -> str:
    """One pass of the DeepFloyd/PixArt caption cleaning used by LlamaGen (lower case, no urls, html, ids, file
    names, odd punctuation; whitespace collapsed).  Differences from the official function: html tags are
    stripped with the standard library's parser (the ``html.parser`` backend the official BeautifulSoup call
    uses) and ftfy's mojibake repair is not applied (only its NFC normalisation), so captions with broken
    encodings may differ; ordinary prompts are cleaned identically."""
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    for rule in _COMPILED_RULES:
        text = rule(text) if callable(rule) else rule[0].sub(rule[1], text)
    return text.strip()


# --------------------------------------------------------------------------------------------------
# padding and packing
def left_pad(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's left padding of right-padded T5 output: features (B, T, D), mask (B, T) (1 = real token).

    Each caption's n real rows move to the end (rows become concat(features[n:], features[:n])), the mask is
    flipped and the padding rows are zeroed.  Returns (features (B, T, D), mask (B, T)).
    """
    length = mask.shape[1]
    real = mask.sum(dim=1, keepdim=True)  # (B, 1)
    source = (torch.arange(length, device=mask.device) + real) % length  # row i takes row (i + n) mod T
    shifted = features.gather(1, source.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    flipped = mask.flip(-1)
    return shifted * flipped.unsqueeze(-1).to(shifted.dtype), flipped


# --------------------------------------------------------------------------------------------------
# the encoder
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def locate_text_encoder(model: str = FLAN_T5_XL, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder holding ``model``: a directory given as is, else its snapshot in the Hugging Face cache
    (``cache_dir``, default HF_HUB_CACHE).  Never downloads; raises FileNotFoundError with one line otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if Path(model).is_dir():
        folder = Path(model)
    else:
        cache = cache_dir or constants.HF_HUB_CACHE
        try:
            folder = Path(snapshot_download(model, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError):
            folder = None
        if folder is None:
            raise FileNotFoundError(
                f"text encoder {model} is not in the local Hugging Face cache {cache}: on a machine with internet "
                f"run `hf download {model}` and copy its cache folder to {cache} (or set HF_HUB_CACHE / pass "
                "cache_dir), or pass the model's local folder"
            )
    missing = [
        what for what, names in (("config.json", ("config.json",)), ("weights", _WEIGHT_FILES),
                                 ("tokenizer", _TOKENIZER_FILES))
        if not any((folder / name).is_file() for name in names)
    ]
    if missing:
        raise FileNotFoundError(
            f"text encoder folder {folder} lacks {', '.join(missing)}: download {model} completely "
            f"(`hf download {model}`)"
        )
    return folder


class T5TextEncoder:
    """A T5 encoder and its tokenizer, loaded from local files only.

    Args:
        model: Hugging Face model id (default ``google/flan-t5-xl``) or a local folder.
        cache_dir: the Hugging Face hub cache to look in (default: HF_HUB_CACHE, under HF_HOME).
        device: where the encoder runs.
        dtype: encoder weights; bfloat16 as LlamaGen's sample script, float16 for Infinity.
    """

    def __init__(
        self,
        model: str = FLAN_T5_XL,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ):
        folder = locate_text_encoder(model, cache_dir)  # before any model work
        from transformers import AutoTokenizer, T5EncoderModel

        self.model_id = model
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.encoder = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=dtype).to(self.device)
        self.encoder.eval()

    @property
    def hidden_size(self) -> int:
        """Feature width (2048 for flan-t5-xl)."""
        return self.encoder.config.d_model

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise (EOS appended, padded to and truncated at ``max_length``) and encode.

        Returns right-padded features (B, max_length, D) float32 and the mask (B, max_length) int64, 1 = real.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = self.tokenizer(
            list(prompts), max_length=max_length, padding="max_length", truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        input_ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        features = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return features.float(), mask

    def encode_llamagen(
        self, prompts: Sequence[str], max_length: int = LLAMAGEN_MAX_LENGTH, clean: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LlamaGen t2i conditions: (caption features (B, 120, D), caption mask (B, 120)), left padded and zeroed.

        ``clean=False`` only lower-cases and strips, as the official ``use_text_preprocessing=False``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_caption(clean_caption(p)) if clean else p.lower().strip() for p in prompts]
        return left_pad(*self.encode(texts, max_length))

    def encode_infinity(self, prompts: Sequence[str], max_length: int = INFINITY_MAX_LENGTH) -> PackedText:
        """Infinity text conditions: the raw prompts, 512 tokens, packed (:class:`PackedText`)."""
        return PackedText.from_padded(*self.encode(prompts, max_length))
