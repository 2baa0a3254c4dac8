"""The T5 text encoder (var/text.py) on a tiny random T5 in a fake local Hugging Face cache (no network)."""

from __future__ import annotations

import shutil

import pytest
import torch

from var.models.infinity import PackedText
from var.text import FLAN_T5_XL, T5TextEncoder, clean_caption, left_pad

WORDS = ["a", "photo", "of", "cat", "dog", "on", "the", "sofa", "red", "car"]


def save_tiny_t5(folder) -> None:
    """A 2-layer random T5 encoder and a unigram tokenizer over a few lower-case words (no upper case: an
    uncleaned 'A' becomes <unk>)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz.,!"] + [(f"▁{w}", -1.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(pieces), d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
                      feed_forward_proj="gated-gelu")
    T5EncoderModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding a tiny model under the flan-t5-xl id, as `hf download` lays it out."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{FLAN_T5_XL.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_tiny_t5(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def encoder(hub_cache):
    return T5TextEncoder(cache_dir=hub_cache, dtype=torch.float32)


def test_missing_weights_stop_before_any_model_work(tmp_path, monkeypatch):
    import transformers

    def must_not_run(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", must_not_run)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", must_not_run)
    with pytest.raises(FileNotFoundError) as error:
        T5TextEncoder(cache_dir=tmp_path)
    message = str(error.value)
    assert "google/flan-t5-xl" in message and str(tmp_path) in message and "hf download" in message
    assert "\n" not in message


def test_incomplete_snapshot_names_what_is_missing(hub_cache, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(next((hub_cache / "models--google--flan-t5-xl" / "snapshots").iterdir()), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks weights"):
        T5TextEncoder(str(folder))


def test_llamagen_flavour_left_pads_cleans_and_zeroes(encoder):
    prompts = ["A PHOTO of a Cat on the sofa!!", "red car"]
    features, mask = encoder.encode_llamagen(prompts)
    assert features.shape == (2, 120, 16) and features.dtype == torch.float32 and mask.shape == (2, 120)
    right, right_mask = encoder.encode([clean_caption(clean_caption(p)) for p in prompts], 120)
    for row, length in enumerate(right_mask.sum(1).tolist()):
        assert mask[row].tolist() == [0] * (120 - length) + [1] * length  # real tokens (EOS included) at the end
        assert features[row, : 120 - length].abs().max() == 0  # padding rows zeroed
        torch.testing.assert_close(features[row, 120 - length:], right[row, :length])
    # the tokenizer has no upper case: lower-casing (with or without cleaning) is what makes these equal
    torch.testing.assert_close(encoder.encode_llamagen(["a photo of a cat on the sofa!!"])[0], features[:1])
    # the cleaning drops brackets; clean=False (the official use_text_preprocessing=False) only lower-cases
    plain = encoder.encode_llamagen(["a cat on the sofa"])[0]
    torch.testing.assert_close(encoder.encode_llamagen(["A cat (on the sofa)"])[0], plain)
    assert not torch.equal(encoder.encode_llamagen(["A cat (on the sofa)"], clean=False)[0], plain)


def test_long_prompts_are_truncated_to_max_length(encoder):
    features, mask = encoder.encode_llamagen([" ".join(WORDS * 20)])
    assert features.shape == (1, 120, 16) and int(mask.sum()) == 120


def test_infinity_flavour_packs_the_real_rows(encoder):
    prompts = ["a red car", "a photo of a dog on the sofa", "cat"]
    packed = encoder.encode_infinity(prompts)
    features, mask = encoder.encode(prompts, 512)
    lens = mask.sum(1).tolist()
    assert packed.lens == tuple(lens)
    expected = torch.cat([features[i, :n] for i, n in enumerate(lens)])
    torch.testing.assert_close(packed.features, expected)
    assert packed[1:].lens == tuple(lens[1:]) and len(packed) == 3
    torch.testing.assert_close(packed[1:2].features, features[1, : lens[1]])


def test_local_folder_instead_of_a_model_id(hub_cache):
    folder = next((hub_cache / "models--google--flan-t5-xl" / "snapshots").iterdir())
    assert T5TextEncoder(str(folder), dtype=torch.float32).hidden_size == 16


def test_left_pad_moves_real_rows_to_the_end():
    features = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1) + 1  # rows 1..4 and 5..8
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    padded, flipped = left_pad(features, mask)
    assert padded.squeeze(-1).tolist() == [[0, 1, 2, 3], [0, 0, 0, 5]]
    assert flipped.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    packed = PackedText.from_padded(features, mask)
    assert packed.features.squeeze(-1).tolist() == [1, 2, 3, 5] and packed.lens == (3, 1)


@pytest.mark.parametrize("caption, cleaned", [  # outputs of the official cleaning (applied twice)
    ("A Photo of a CAT sitting on the Sofa.", "a photo of a cat sitting on the sofa."),
    ("visit https://example.com/x.jpg now!!", "visit now!!"),
    ("<b>Bold</b> &amp; more", "bold more"),
    ("this-is-my-cute-cat-really", "this is my cute cat really"),
    ("“Quoted” ‘single’ — dash", "\"quoted\" 'single' - dash"),
    ("wallpaper 1920x1080 image.png page 12", "wallpaper"),
    ("@user hello #123 (see [notes]) / *stars*", "hello see notes stars"),
    ("  'A quoted caption'  ", "a quoted caption"),
    ("中文 text", "text"),
])
def test_caption_cleaning(caption, cleaned):
    assert clean_caption(clean_caption(caption)) == cleaned
