"""Evaluation: torch-fidelity plumbing, metrics against torch-fidelity, reference handling, the CLI end to end.

Plumbing tests use a registered weight-free toy extractor (milliseconds); one test runs the real Inception
architecture with random weights generated in a temp dir; one runs sampling sharded over two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_pair, tiny_llamagen, tiny_vqvae_config
from torch_fidelity import calculate_metrics
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from var.checkpoints import save_model
from var.cli import main
from var.data import DigitsDataset
from var.eval.classifier import load_digit_classifier, save_digit_classifier
from var.eval.evaluate import Evaluator
from var.eval.fidelity import (
    INCEPTION_FILE,
    INCEPTION_URL,
    fidelity_kwargs,
    register_extractor,
    strict_fp32,
    write_random_inception_weights,
)
from var.eval.images import ImageFolder, Samples, load_samples, save_npz_samples, save_pngs
from var.eval.metrics import FeatureStats, frechet_distance, inception_score, precision_recall, within_class_spread
from var.eval.reference import ReferenceSource
from var.tokenizers.vqvae import VQVAE
from var.utils import to_uint8

REPO = Path(__file__).resolve().parents[1]
TOY = "toy-pool"


class ToyExtractor(FeatureExtractorBase):
    """Weight-free: 4x4 average pool of the image and fixed random projections (32-d features, 10 logits)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(48, 32, generator=generator))
        self.register_buffer("head", torch.randn(32, 10, generator=generator) / 4)

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, images):
        assert images.dtype == torch.uint8
        features = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1) @ self.projection  # (B, 32)
        outputs = {"pool": features, "logits": features @ self.head}
        return tuple(outputs[name] for name in self.features_list)


register_extractor(TOY, ToyExtractor)
register_extractor(TOY, ToyExtractor)  # guarded: a second registration is a no-op


class TensorImages(torch.utils.data.Dataset):
    """A uint8 (N, 3, H, W) tensor as the Dataset torch-fidelity takes."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def random_images(count: int, seed: int, side: int = 16, low: int = 0, high: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (count, 3, side, side), generator=generator, dtype=torch.uint8)


def digit_images(split: str, side: int = 16, noise: float = 0.0) -> Samples:
    data = DigitsDataset(split, side)
    images = data.images + noise * torch.randn(data.images.shape, generator=torch.Generator().manual_seed(1))
    return Samples(to_uint8(images.clamp(-1, 1).add(1).mul(0.5)), data.labels)


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    """Never read or write the user's caches: reference features and torch hub files live in tmp."""
    monkeypatch.setenv("VAR_CACHE_DIR", str(tmp_path / "var_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    vqvae, model = make_tiny_pair(seed=0)
    bundle = tmp_path / "bundle"
    save_model(vqvae, bundle)
    save_model(model, bundle)
    return bundle


@pytest.fixture(scope="session")
def digit_classifier_path(tmp_path_factory, digit_classifier) -> str:
    path = tmp_path_factory.mktemp("judge") / "digits.safetensors"
    save_digit_classifier(digit_classifier, path)
    return str(path)


# -- torch-fidelity plumbing ---------------------------------------------------------------------------------
def test_fidelity_kwargs_reject_unknown_options_and_pin_the_device():
    with pytest.raises(ValueError, match="device"):
        fidelity_kwargs(False, device="cpu")  # torch-fidelity itself would silently ignore this
    with pytest.raises(ValueError, match="did you mean isc_splits"):
        fidelity_kwargs(False, isc_split=2)
    settings = fidelity_kwargs(False, isc_splits=3)
    assert settings["cuda"] is False and settings["cache"] is False and settings["verbose"] is False
    assert settings["isc_splits"] == 3


def test_strict_fp32_disables_tf32_and_restores():
    before = torch.backends.cuda.matmul.fp32_precision
    with strict_fp32():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_metrics_equal_torch_fidelity_on_the_same_features(tmp_path):
    samples, reference = random_images(64, 0), random_images(80, 1, low=40, high=200)
    save_npz_samples(tmp_path / "ref.npz", Samples(reference))
    ours = Evaluator(TOY, str(tmp_path / "ref.npz"), progress=False).evaluate(Samples(samples))
    theirs = calculate_metrics(**fidelity_kwargs(
        False, input1=TensorImages(samples), input2=TensorImages(reference), feature_extractor=TOY,
        fid=True, isc=True, kid=True, prc=True, isc_splits=1, samples_shuffle=False, kid_subset_size=64,
        save_cpu_ram=True,
    ))
    assert ours["fid"] > 1
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6, abs=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])


def test_exports_are_shuffled_with_labels_aligned_so_inception_score_ignores_generation_order(tmp_path):
    """Samplers emit class-ordered sets; exported in a seeded shuffled order, consecutive IS splits see every class."""
    classes, per_class = 100, 40
    labels = torch.arange(classes).repeat_interleave(per_class)  # class-ordered, as generated
    images = (labels % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()  # pixel = label
    confident = F.one_hot(labels, classes).double() * 20  # synthetic logits of a confident classifier
    ordered_is = inception_score(confident, split_size=400)[0]
    scores = []
    for order in (torch.arange(len(labels)), torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))):
        save_npz_samples(tmp_path / "samples.npz", Samples(images[order], labels[order]).shuffled())
        exported = load_samples(tmp_path / "samples.npz")
        assert torch.equal(exported.images[:, 0, 0, 0].long(), exported.labels)  # labels stay with their images
        assert not torch.equal(exported.labels, labels[order])  # really shuffled
        assert sorted(exported.labels.tolist()) == labels.tolist()
        scores.append(inception_score(F.one_hot(exported.labels, classes).double() * 20, split_size=400)[0])
    # ~10 classes per split when class-ordered, ~all 100 when shuffled, whatever order they were generated in
    assert ordered_is < 11 and min(scores) > 3 * ordered_is
    assert scores[0] == pytest.approx(scores[1], rel=0.05)
    assert torch.equal(Samples(images, labels).shuffled(3).labels, Samples(images, labels).shuffled(3).labels)


def test_within_class_spread_is_zero_for_collapsed_classes_and_scales_with_the_spread():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(50)
    centres = torch.randn(4, 8, generator=generator)[labels] * 10
    noise = torch.randn(200, 8, generator=generator)
    assert within_class_spread(centres, labels) == pytest.approx(0, abs=1e-9)  # ten identical 0s: no diversity
    assert within_class_spread(centres + 2 * noise, labels) == pytest.approx(
        2 * within_class_spread(centres + noise, labels))  # the class centres do not count


def test_inception_score_uses_consecutive_unshuffled_splits():
    logits = torch.randn(100, 10, generator=torch.Generator().manual_seed(0)) * 3
    mean, std, splits = inception_score(logits, split_size=50)
    from torch_fidelity.metric_isc import isc_features_to_metric

    reference = isc_features_to_metric(logits, splits=2, shuffle=False)
    assert splits == 2
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-9)
    assert inception_score(logits.flip(0), split_size=50)[0] == pytest.approx(mean)  # same two halves
    assert inception_score(logits[torch.randperm(100)], split_size=50)[0] != pytest.approx(mean)  # order matters


def test_fid_is_zero_for_identical_sets_and_positive_otherwise():
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    same = frechet_distance(FeatureStats.from_features(features), FeatureStats.from_features(features.flip(0)))
    shifted = frechet_distance(FeatureStats.from_features(features), FeatureStats.from_features(features + 0.5))
    assert 0 <= same < 1e-9
    assert shifted == pytest.approx(16 * 0.25, rel=1e-9)  # a pure mean shift adds |delta|^2 exactly


def test_too_few_samples_give_clear_errors_not_nan(tmp_path):
    with pytest.raises(ValueError, match="Inception Score needs at least 2"):
        inception_score(torch.randn(1, 10))
    with pytest.raises(ValueError, match="FID needs at least 2"):
        FeatureStats.from_features(torch.randn(1, 8))
    with pytest.raises(ValueError, match="precision/recall needs at least 4"):
        precision_recall(torch.randn(3, 8), torch.randn(50, 8))
    save_npz_samples(tmp_path / "ref.npz", Samples(random_images(20, 1)))
    with pytest.raises(ValueError, match="at least"):
        Evaluator(TOY, str(tmp_path / "ref.npz"), progress=False).evaluate(Samples(random_images(1, 0)))


# -- files and references ----------------------------------------------------------------------------------
def test_openai_npz_round_trip_and_png_export(tmp_path):
    samples = Samples(random_images(6, 0, side=8), torch.tensor([0, 0, 1, 1, 2, 2]))
    save_npz_samples(tmp_path / "samples.npz", samples)
    with np.load(tmp_path / "samples.npz") as data:  # what the OpenAI evaluator reads
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 8, 8, 3)
        assert np.array_equal(data["arr_0"][2], samples.images[2].permute(1, 2, 0).numpy())
    loaded = load_samples(tmp_path / "samples.npz")
    assert torch.equal(loaded.images, samples.images) and torch.equal(loaded.labels, samples.labels)
    save_pngs(tmp_path / "png", samples)
    from_pngs = load_samples(tmp_path / "png")
    assert torch.equal(from_pngs.images, samples.images) and torch.equal(from_pngs.labels, samples.labels)


def test_openai_reference_batch_is_accepted_as_is(tmp_path):
    reference = random_images(40, 1, low=30)
    samples = Samples(random_images(30, 0))
    save_npz_samples(tmp_path / "images.npz", Samples(reference))
    by_images = Evaluator(TOY, str(tmp_path / "images.npz"), progress=False).evaluate(samples)
    # an OpenAI-style ref batch: float64 mu/sigma, sFID stats and the reference images
    ref_features = Evaluator(TOY, None, ["is"], progress=False).extractor.extract(reference, progress=False)["pool"]
    stats = FeatureStats.from_features(ref_features)
    np.savez(tmp_path / "VIRTUAL_toy.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu[:4],
             sigma_s=stats.sigma[:4, :4], arr_0=reference.permute(0, 2, 3, 1).numpy())
    source = ReferenceSource.parse(str(tmp_path / "VIRTUAL_toy.npz"))
    assert (source.kind, source.has_images) == ("stats", True)
    by_stats = Evaluator(TOY, str(tmp_path / "VIRTUAL_toy.npz"), progress=False).evaluate(samples)
    for key in ("fid", "kid", "precision", "recall"):
        assert by_stats[key] == pytest.approx(by_images[key], rel=1e-9)
    np.savez(tmp_path / "stats_only.npz", mu=stats.mu, sigma=stats.sigma)
    stats_only = Evaluator(TOY, str(tmp_path / "stats_only.npz"), progress=False).evaluate(samples)
    assert stats_only["fid"] == pytest.approx(by_images["fid"], rel=1e-9)
    assert "kid" not in stats_only and any("statistics only" in note for note in stats_only["notes"])


def test_reference_cache_is_keyed_by_weights(tmp_path, digit_classifier_path):
    classifier = load_digit_classifier(digit_classifier_path)
    with torch.no_grad():
        classifier.out.bias += 1.0  # same architecture, different file
    other = tmp_path / "other.safetensors"
    save_digit_classifier(classifier, other)
    samples = digit_images("test")
    metas = []
    for weights in (digit_classifier_path, digit_classifier_path, str(other)):
        evaluator = Evaluator("digits-classifier", "digits-test", ["fid"], weights, progress=False)
        evaluator.evaluate(samples)
        metas.append(evaluator.describe()["reference_loaded"][0])
    assert [m["cached"] for m in metas] == [False, True, False]
    assert metas[0]["cache_path"] == metas[1]["cache_path"] != metas[2]["cache_path"]


def test_training_config_as_reference(tmp_path):
    samples = digit_images("test", noise=0.2)
    by_name = Evaluator(TOY, "digits-test", ["fid"], progress=False).evaluate(samples)
    by_config = Evaluator(TOY, f"{REPO}/configs/digits.yaml:val", ["fid"], progress=False).evaluate(samples)
    assert by_config["fid"] == pytest.approx(by_name["fid"], abs=1e-9)  # digits' val split is the held-out part

    root = tmp_path / "data"
    save_pngs(root / "train" / "cat", Samples(random_images(4, 0, side=20)))
    save_pngs(root / "train" / "dog", Samples(random_images(4, 1, side=20)))
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  name: imagefolder\n  root: {root}\n  image_size: 16\n  hflip: true\n")
    source = ReferenceSource.parse(str(config))
    assert source.kind == "config" and len(source.images(16, None)) == 8
    first = torch.stack([source.images(16, None)[i] for i in range(8)])
    assert torch.equal(first, torch.stack([source.images(16, None)[i] for i in range(8)]))  # no random crop/flip
    fingerprint = source.fingerprint(16, None)
    save_pngs(root / "train" / "dog" / "more", Samples(random_images(1, 2, side=20)))
    assert source.fingerprint(16, None) != fingerprint  # new images, new cache key

    for spec, message in [
        (f"{config}:test", "unknown split 'test'"),
        (f"{config}:val", "is not a folder"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            ReferenceSource.parse(spec)
    config.write_text("data:\n  nmae: digits\n")
    with pytest.raises(ValueError, match="name"):
        ReferenceSource.parse(str(config))


def test_bad_inputs_fail_with_clear_errors(tmp_path, tiny_bundle):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_samples(tmp_path / "floats.npz")
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="neither mu/sigma"):
        ReferenceSource.parse(str(tmp_path / "empty.npz"))
    folder = tmp_path / "mixed"
    save_pngs(folder, Samples(random_images(1, 0, side=8)))
    save_pngs(folder / "more", Samples(random_images(1, 0, side=12)))
    with pytest.raises(ValueError, match="--ref-resize"):
        ImageFolder(folder)[1]
    assert ImageFolder(folder, resize=8)[1].shape == (3, 8, 8)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_samples(tmp_path / "broken")
    for argv, message in [
        (["--samples", str(tmp_path / "floats.npz"), "--ckpt", str(tiny_bundle)], "either --samples"),
        (["--ckpt", str(tiny_bundle), "--extractor", "nope"], "unknown feature extractor 'nope'"),
        (["--ckpt", str(tiny_bundle), "--extractor", TOY, "--sweep", "cfgg=1,2"], "--sweep expects"),
        (["--ckpt", str(tiny_bundle), "--extractor", TOY, "--metrics", "fid"], "need a reference"),
        (["--ckpt", str(tiny_bundle), "--extractor", TOY, "--ref", "nowhere"], "not a file, a folder, a config"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main(["eval", *argv])


# -- weights --------------------------------------------------------------------------------------------------
def test_missing_inception_weights_fail_before_any_sampling(tiny_bundle, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the weights were checked")

    monkeypatch.setattr("var.eval.cli.generate_samples", no_sampling)
    monkeypatch.setattr("var.eval.cli.load_models", no_sampling)
    with pytest.raises(SystemExit) as error:
        main(["eval", "--ckpt", str(tiny_bundle), "--ref", "digits"])
    message = str(error.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message and "--inception-weights" in message
    assert os.environ["TORCH_HOME"] in message  # says exactly where to put the file


def test_random_inception_pipeline_end_to_end(tmp_path):
    weights = tmp_path / "random_inception.pth"
    write_random_inception_weights(weights)
    with pytest.raises(ValueError, match="--allow-weights-mismatch"):
        Evaluator("inception-v3-compat", None, ["is"], str(weights))
    set_a = Samples(random_images(4, 0, side=16))
    set_b = Samples(random_images(4, 1, side=16, low=60, high=180))
    save_npz_samples(tmp_path / "a.npz", set_a)
    with pytest.warns(UserWarning, match="not the FID Inception weights"):
        evaluator = Evaluator("inception-v3-compat", str(tmp_path / "a.npz"), ["fid", "is", "kid"], str(weights),
                              allow_weights_mismatch=True, progress=False)
    same = evaluator.evaluate(set_a)
    other = evaluator.evaluate(set_b)  # reference features come from the in-memory reference now
    assert same["fid"] < 1e-6 and other["fid"] > 1.0
    assert np.isfinite(other["is"]) and 1.0 <= other["is"] <= 1008
    assert np.isfinite(other["kid"]) and other["kid"] > same["kid"]


# -- offline quality: classifier space ------------------------------------------------------------------------
def test_classifier_space_fid_grows_with_noise_on_real_digits(digit_classifier_path):
    evaluator = Evaluator("digits-classifier", "digits", ["fid", "kid", "is"], digit_classifier_path, progress=False)
    results = [evaluator.evaluate(digit_images("test", noise=noise)) for noise in (0.0, 0.2, 0.5, 1.0)]
    fids = [r["fid"] for r in results]
    assert fids == sorted(fids) and fids[0] < fids[-1] / 10, fids
    assert results[0]["class_consistency"] > 0.9
    assert results[-1]["class_consistency"] < results[0]["class_consistency"]


def test_digit_extractor_is_usable_from_torch_fidelity_directly(tmp_path, digit_classifier_path):
    samples, reference = digit_images("test", noise=0.3), digit_images("test")
    save_npz_samples(tmp_path / "ref.npz", reference)
    ours = Evaluator("digits-classifier", str(tmp_path / "ref.npz"), ["fid", "is"], digit_classifier_path,
                     progress=False).evaluate(samples)
    theirs = calculate_metrics(**fidelity_kwargs(
        False, input1=TensorImages(samples.images), input2=TensorImages(reference.images), fid=True, isc=True,
        feature_extractor="digits-classifier", feature_extractor_weights_path=digit_classifier_path,
        isc_splits=1, samples_shuffle=False,
    ))
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)


# -- the CLI with a model -------------------------------------------------------------------------------------
def test_eval_ckpt_sweep_exports_reports_and_plot(tmp_path, tiny_bundle, capsys):
    out = tmp_path / "eval"
    main(["eval", "--ckpt", str(tiny_bundle), "--device", "cpu", "--per-class", "2", "--batch-size", "4",
          "--extractor", TOY, "--ref", "digits", "--sweep", "cfg=0,3", "--png", "--out", str(out), "--no-progress"])
    assert "sweep.png" in capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["values"] == [0.0, 3.0] and all(m["fid"] > 0 for m in summary["metrics"])
    assert (out / "sweep.png").stat().st_size > 1000
    report = json.loads((out / "cfg_3.0" / "report.json").read_text())
    sampling = report["sampling"]
    assert (sampling["cfg"], sampling["top_k"], sampling["top_p"], sampling["seed"]) == (3.0, 900, 0.96, 0)
    assert report["evaluation"]["extractor"] == TOY and report["num_samples"] == 6
    exported = load_samples(out / "cfg_3.0" / "samples.npz")
    assert exported.images.shape == (6, 3, 8, 8) and sorted(exported.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(list((out / "cfg_3.0" / "samples").rglob("*.png"))) == 6
    # the same batches and seeds as `var sample`: evaluation scores exactly what sampling shows
    main(["sample", "--ckpt", str(tiny_bundle), "--device", "cpu", "--per-class", "2", "--batch-size", "4",
          "--cfg", "3", "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "sampled.npz")])
    assert torch.equal(load_samples(tmp_path / "sampled.npz").images, exported.images)


def test_eval_samples_the_raster_ar_for_ar_samplers(tmp_path):
    torch.manual_seed(0)
    bundle = tmp_path / "ar_bundle"
    save_model(VQVAE(tiny_vqvae_config(patch_nums=(4,))), bundle)
    save_model(tiny_llamagen(n_layer=1, dim=32), bundle, "ar")
    passes = {}
    for sampler in ("ar", "sjd"):
        out = tmp_path / sampler
        main(["eval", "--ckpt", str(bundle), "--sampler", sampler, "--device", "cpu", "--per-class", "2",
              "--no-metrics", "--no-progress", "--out", str(out)])
        assert sorted(load_samples(out / "samples.npz").labels.tolist()) == [0, 0, 1, 1, 2, 2]
        passes[sampler] = json.loads((out / "report.json").read_text())["sampling"]["passes_per_image"]
    assert passes["ar"] == 16 and 1 <= passes["sjd"] < 16  # 4x4 tokens: one pass each, or fewer speculating


def test_sharded_sampling_over_two_processes_matches_one(tmp_path, tiny_bundle):
    common = ["eval", "--ckpt", str(tiny_bundle), "--device", "cpu", "--per-class", "3", "--batch-size", "2",
              "--no-metrics", "--no-progress"]
    main([*common, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "var.cli", *common, "--out", str(tmp_path / "two")]
    finished = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = load_samples(tmp_path / "one" / "samples.npz"), load_samples(tmp_path / "two" / "samples.npz")
    # 9 samples in 5 batches over 2 processes: every (class, index) once, in order, with the same pixels
    assert sorted(two.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(one.labels, two.labels) and torch.equal(one.images, two.images)  # the same export order
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["sampling"]["num_processes"] == 2
    assert report["sampling"]["passes_per_image"] == json.loads((tmp_path / "one" / "report.json").read_text())[
        "sampling"]["passes_per_image"]
