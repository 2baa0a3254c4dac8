import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_vqvae_config
from safetensors.torch import load_file

from var.checkpoints import load_model, save_model
from var.config import ConfigError, ExperimentConfig, OptimConfig, load_experiment, to_dict
from var.loading import load_pair
from var.models.var import VAR
from var.sample.logits import SamplingSettings
from var.sample.raster import ARSampler
from var.tokenizers.vqvae import VQVAE
from var.train.ar_trainer import ARTrainer
from var.train.loop import cap_loss_scale
from var.train.losses import distillation_kl, token_cross_entropy
from var.train.optim import lr_multiplier, param_groups, weight_decay_at
from var.train.perceptual import load_perceptual_loss
from var.train.tokenizer import TokenizerTrainer
from var.train.var_trainer import VARTrainer, progressive_stage

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"name": "shapes", "image_size": 8, "num_samples": 64},
    "tokenizer": {
        "model": to_dict(tiny_vqvae_config()),
        "train": {"steps": 30, "batch_size": 16, "log_every": 10, "checkpoint_every": 100,
                  "optim": {"lr": 3e-3, "weight_decay": 0.0}},
    },
    "var": {
        "model": {"depth": 2, "width": 32, "num_heads": 2, "drop_path_rate": 0.0},
        "train": {"steps": 30, "batch_size": 16, "log_every": 10, "checkpoint_every": 100,
                  "optim": {"lr": 3e-3}},
    },
    "sample": {"cfg": 1.0, "top_k": 0, "top_p": 0.0},
}


def tiny_experiment(*overrides: str) -> ExperimentConfig:
    from var.config import apply_overrides, from_dict

    return from_dict(ExperimentConfig, apply_overrides(yaml.safe_load(yaml.safe_dump(TINY)), overrides,
                                                       ExperimentConfig))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_bundle(tmp_path_factory) -> Path:
    """A (random-weight) tokenizer bundle for 8 px shapes: enough to train transformers on."""
    directory = tmp_path_factory.mktemp("tokenizer")
    torch.manual_seed(0)
    save_model(VQVAE(tiny_vqvae_config()), directory, "vqvae")
    return directory


@pytest.fixture(scope="module")
def shapes_batch():
    from var.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(name="shapes", image_size=8, num_samples=64))
    images, labels = zip(*(dataset[i] for i in range(32)), strict=True)
    return torch.stack(images), torch.tensor(labels)


# ---------------------------------------------------------------------------------------------------
# config
def test_unknown_config_keys_are_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'var.train.steps'"):
        load_experiment(None, ["var.train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer:\n  model:\n    vocab_sise: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'tokenizer.model.vocab_size'"):
        load_experiment(bad)


@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    experiment = load_experiment(REPO / "configs" / f"{name}.yaml")
    assert experiment.data.image_size == experiment.tokenizer.model.image_size


def test_imagenet_recipes_match_the_official_hyper_parameters():
    # spec_var 4.3: (depth, global batch, epochs, base lr, init_adaln_gamma, end ratio, final weight decay)
    official = {16: (768, 200, 1e-4, 1e-3, 0.1, 0.05), 20: (768, 250, 1e-4, 1e-3, 0.1, 0.05),
                24: (768, 350, 8e-5, 1e-4, 0.01, 0.05), 30: (1024, 350, 8e-5, 1e-5, 0.01, 0.08)}
    for depth, (batch, epochs, base_lr, gamma, end_ratio, wd_end) in official.items():
        var = load_experiment(REPO / "configs" / f"imagenet256_d{depth}.yaml").var
        assert var.model.depth == depth and var.train.epochs == epochs
        assert var.train.batch_size * 8 == batch  # per GPU, 8 GPUs
        optim = var.train.optim
        assert (optim.base_lr, optim.end_ratio, optim.weight_decay, optim.grad_clip) == (base_lr, end_ratio, 0.05, 2.0)
        assert (optim.weight_decay_end or optim.weight_decay) == wd_end
        assert var.model.init_adaln_gamma == gamma and var.loss.label_smoothing == 0.0


# ---------------------------------------------------------------------------------------------------
# optimiser
def test_weight_decay_grouping_follows_the_official_rule():
    model = VAR(depth=2, width=32, num_heads=2, vocab_size=16, z_channels=4, num_classes=3, patch_nums=(1, 2))
    groups = param_groups(model.named_parameters(), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"class_embed.weight", "word_embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.ffn.fc1.weight",
            "head.weight", "blocks.0.modulation.weight"} <= decayed
    assert {"pos_embed", "pos_start", "level_embed.weight", "blocks.0.attn.log_temperature", "blocks.0.attn.q_bias",
            "blocks.0.attn.v_bias", "head.bias", "blocks.0.ffn.fc1.bias"} <= exempt
    assert decayed.isdisjoint(exempt) and len(decayed | exempt) == len(names)


def test_official_schedule_family():
    def curve(schedule, end=0.1):
        config = OptimConfig(warmup_steps=0, end_ratio=end, schedule=schedule)
        return [lr_multiplier(step, 101, config) for step in range(101)]  # progress = step / 100

    lin, lin00, split, exp = curve("lin"), curve("lin00"), curve("lin0.8"), curve("exp")
    assert lin[15] == 1.0 and lin[16] < 1 and lin[100] == pytest.approx(0.1)  # flat for 15 %, then linear
    assert lin00[0] == 1.0 and lin00[50] == pytest.approx(0.55) and lin00[100] == pytest.approx(0.1)
    middle = (1 + 0.1 + 0.9 * 0.2) / 2  # halfway between 1 and where lin00 is at T = 0.8
    assert split[40] == pytest.approx(1 + (middle - 1) * 0.5) and split[80] == pytest.approx(middle)
    assert split[90] == pytest.approx(0.1 + (middle - 0.1) * 0.5) and split[100] == pytest.approx(0.1)
    assert exp[15] == 1.0 and exp[100] == pytest.approx(0.1) and exp[50] == pytest.approx(0.1 ** (35 / 85))
    assert curve("lin1")[100] == pytest.approx((1 + 0.1) / 2)  # T = 1: the first piece fills the run
    for bad in ("lin2", "linear", "cosine"):
        with pytest.raises(ValueError, match=f"unknown lr schedule '{bad}'"):
            curve(bad)


def test_progressive_training_switches_lin0_to_lin_pg(tmp_path, tokenizer_bundle):
    experiment = tiny_experiment("var.loss.progressive=0.5", "var.loss.progressive_start_scale=1",
                                 "var.train.steps=2", "var.train.optim.schedule=lin0")
    trainer = VARTrainer(experiment, tmp_path / "run", tokenizer=tokenizer_bundle, progress=False)
    assert trainer.config.optim.schedule == "lin0.5"


def test_lr_schedule_warmup_then_lin0_decay():
    config = OptimConfig(warmup_steps=10, warmup_start=0.005, end_ratio=0.1, schedule="lin0")
    total = 210
    assert lr_multiplier(0, total, config) == pytest.approx(0.005)
    assert lr_multiplier(5, total, config) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_multiplier(10, total, config) == 1.0
    assert lr_multiplier(15, total, config) == 1.0  # flat for the first 5 % after warm-up
    assert lr_multiplier(total - 1, total, config) == pytest.approx(0.1)
    decay = [lr_multiplier(s, total, config) for s in range(30, total)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert OptimConfig().warmup_steps is None and lr_multiplier(0, 500, OptimConfig()) == pytest.approx(0.005)


def test_weight_decay_cosine_and_peak_lr_rule(tmp_path, tokenizer_bundle):
    config = OptimConfig(weight_decay=0.05, weight_decay_end=0.08)
    assert weight_decay_at(0, 100, config) == pytest.approx(0.05)
    assert weight_decay_at(99, 100, config) == pytest.approx(0.08)
    assert weight_decay_at(50, 100, OptimConfig()) == pytest.approx(0.05)
    trainer = VARTrainer(tiny_experiment("var.train.optim.lr=null", "var.train.optim.base_lr=1e-4",
                                                 "var.train.grad_accum=2"),
                                 tmp_path / "run", tokenizer=tokenizer_bundle, progress=False)
    assert trainer.peak_lrs["var"] == pytest.approx(1e-4 * 16 * 2 / 256)


# ---------------------------------------------------------------------------------------------------
# training runs
def test_tokenizer_training_reduces_reconstruction_error(tmp_path, shapes_batch):
    images, _ = shapes_batch
    trainer = TokenizerTrainer(tiny_experiment(), tmp_path / "tok", progress=False)

    def recon_error():
        with torch.no_grad():
            model = trainer.vqvae.eval()
            error = F.l1_loss(model.decode(model.encode(images)), images).item()
            model.train()
            return error

    before = recon_error()
    metrics = trainer.fit()
    assert recon_error() < 0.7 * before
    assert 0 < metrics["usage/all"] <= 1 and "usage/s3" in metrics
    vqvae = load_model(tmp_path / "tok" / "checkpoints" / "step_0000030", "vqvae")
    assert vqvae.config.patch_nums == (1, 2, 3, 4)


def test_perceptual_loss_switches_off_with_a_warning_when_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.warns(UserWarning, match="perceptual loss disabled"):
        trainer = TokenizerTrainer(tiny_experiment("tokenizer.loss.perceptual_weight=1.0",
                                                   "tokenizer.loss.gan_weight=0.1", "tokenizer.train.steps=2"),
                                   tmp_path / "tok", progress=False)
    assert trainer.perceptual is None and trainer.discriminator is not None
    assert "gan_d" in trainer.fit()


def test_perceptual_loss_equals_lpips_with_the_same_weights(tmp_path, monkeypatch):
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained`
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()  # random VGG
    vgg = {f"features.{key.split('.', 2)[2]}": value  # net.slice{k}.{index}.weight -> features.{index}.weight
           for key, value in reference.state_dict().items() if key.startswith("net.slice")}
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(vgg, hub / "checkpoints" / "vgg16-397923af.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    ours = load_perceptual_loss()  # the lpips package's heads are found without being imported
    assert ours.learned_heads
    images, targets = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference(images, targets).mean()
        assert torch.allclose(ours(images, targets), expected, rtol=1e-5, atol=1e-7)
        assert ours(images, images).item() == 0


def test_fp16_loss_scale_is_capped_like_the_official_trainer():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**17)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    cap_loss_scale(scaler)
    assert scaler.get_scale() == 2.0**15
    scaler.update(2.0**12)
    cap_loss_scale(scaler)
    assert scaler.get_scale() == 2.0**12  # below the cap: untouched
    cap_loss_scale(None)  # bf16 / fp32 runs have no scaler


def _ce_on(model, tokenizer, images, labels, num_scales=None):
    with torch.no_grad():
        indices = tokenizer.encode(images)
        logits = model.eval()(labels, tokenizer.quantize.teacher_forcing_input(indices), num_scales=num_scales)
        targets = torch.cat(indices, 1)[:, : logits.shape[1]]
        return token_cross_entropy(logits, targets).mean().item()


def test_var_training_reduces_loss_and_writes_a_bundle(tmp_path, tokenizer_bundle, shapes_batch):
    images, labels = shapes_batch
    experiment = tiny_experiment("var.train.sample_every=30", "var.loss.scale_weights=[1,1,2,2]")
    trainer = VARTrainer(experiment, tmp_path / "run", tokenizer=tokenizer_bundle, progress=False)
    model, tokenizer = trainer.unwrap(trainer.model), trainer.tokenizer
    before = _ce_on(model, tokenizer, images, labels)
    model.train()
    trainer.fit()
    assert _ce_on(model, tokenizer, images, labels) < before - 0.3
    vqvae, loaded = load_pair(tmp_path / "run")  # the run dir is a bundle source for sampling
    assert torch.equal(loaded.head.weight, model.head.weight)
    assert (tmp_path / "run" / "samples" / "step_0000030.png").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["var"]["tokenizer"] == str(tokenizer_bundle)


def test_raster_ar_training_uses_single_scale_tokens(tmp_path, tokenizer_bundle):
    trainer = ARTrainer(tiny_experiment("var.train.sample_every=30"), tmp_path / "ar",
                                 tokenizer=tokenizer_bundle, progress=False)
    assert trainer.tokenizer.patch_nums == (4,) and trainer.model_config.block_size == 16
    assert type(trainer.model_config).__name__ == "LlamaGenConfig" and trainer.model_config.n_layer == 2
    first = trainer.fit()["loss"]
    bundle = tmp_path / "ar" / "checkpoints" / "step_0000030"
    assert load_model(bundle, "ar").grid == (4, 4) and load_model(bundle, "vqvae").patch_nums == (4,)
    assert (tmp_path / "ar" / "samples" / "step_0000030.png").is_file()
    vqvae, ar = load_pair(tmp_path / "ar", var_name="ar")  # what 'var sample --sampler ar' loads
    samples = ARSampler(ar, vqvae, SamplingSettings(top_k=0, top_p=0.0)).sample([0, 1], seed=0)
    assert samples.images.shape == (2, 3, 8, 8)
    resumed = ARTrainer(tiny_experiment("var.train.steps=60"), tmp_path / "ar",
                                 resume=True, progress=False)
    assert resumed.step == 30 and resumed.fit()["loss"] < first
    with pytest.raises(ValueError, match="VAR only"):
        ARTrainer(tiny_experiment("var.loss.progressive=0.5"), tmp_path / "ar2",
                           tokenizer=tokenizer_bundle, progress=False)


def test_progressive_schedule_grows_scales_and_ramps_the_newest():
    loss = tiny_experiment("var.loss.progressive=0.5", "var.loss.progressive_start_scale=1",
                           "var.loss.progressive_ramp_steps=10").var.loss
    stages = [progressive_stage(s, 100, 10, loss, 4) for s in range(100)]
    assert stages[0] == (1, 1.0) and stages[9] == (1, 1.0)  # warm-up: first stage, not ramped
    assert [s for s, _ in stages] == sorted(s for s, _ in stages) and stages[60] == (3, 1.0)
    began = next(i for i, (s, _) in enumerate(stages) if s == 2)
    assert stages[began][1] == 0.01 and stages[began + 5][1] == pytest.approx(0.5)
    assert progressive_stage(5, 100, 10, tiny_experiment().var.loss, 4) == (3, 1.0)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tokenizer_bundle):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    overrides = ["var.train.steps=40", "var.train.checkpoint_every=6", "var.train.keep_checkpoints=2",
                 "var.model.drop_path_rate=0.05"]  # drop path: the RNG stream matters too
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "var.cli", "train", "--config", str(config), "--out", str(killed),
         "--tokenizer", str(tokenizer_bundle), "--no-progress", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in process.stdout:
        if "saved checkpoint" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    load_pair(killed)  # whatever the kill interrupted, latest is a complete bundle
    interrupted_at = int((killed / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 6 <= interrupted_at < 40 and interrupted_at % 6 == 0

    resumed = VARTrainer(load_experiment(killed / "config.yaml", overrides), killed, resume=True,
                                 progress=False)
    assert resumed.step == interrupted_at
    resumed.fit()
    straight = VARTrainer(load_experiment(config, overrides), tmp_path / "straight",
                                  tokenizer=tokenizer_bundle, progress=False)
    straight.fit()

    final = "checkpoints/step_0000040/var.safetensors"
    resumed_weights, straight_weights = load_file(killed / final), load_file(tmp_path / "straight" / final)
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=1e-5, atol=1e-6)
    left = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert left == ["latest", "step_0000036", "step_0000040"]  # the last two kept, no temporary leftovers


def _interrupt_and_resume(make_trainer, tmp_path, name: str) -> None:
    """Run 4 steps (checkpoints at 2 and 4); copy the run as if killed after step 2, resume it, compare."""
    make_trainer(tmp_path / "a", resume=False).fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000004")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_0000002\n")
    resumed = make_trainer(tmp_path / "b", resume=True)
    assert resumed.step == 2
    resumed.fit()
    expected = load_file(tmp_path / "a" / "checkpoints" / "step_0000004" / name)
    for key, value in load_file(tmp_path / "b" / "checkpoints" / "step_0000004" / name).items():
        torch.testing.assert_close(value, expected[key])


def test_resume_restores_ema_bf16_and_accumulation_state(tmp_path, tokenizer_bundle):
    experiment = tiny_experiment("var.train.steps=4", "var.train.checkpoint_every=2", "var.train.ema_decay=0.5",
                                 "var.train.mixed_precision=bf16", "var.train.grad_accum=2")
    _interrupt_and_resume(lambda run, resume: VARTrainer(experiment, run, tokenizer=tokenizer_bundle,
                                                                 resume=resume, progress=False), tmp_path,
                          "var.safetensors")
    # the bundle holds the EMA weights, the training state the trained ones
    final = tmp_path / "a" / "checkpoints" / "step_0000004"
    state = torch.load(final / "training_state.pt", weights_only=True)
    assert not torch.equal(load_file(final / "var.safetensors")["head.weight"], state["trained_weights"]["head.weight"])
    with pytest.raises(ValueError, match="--resume"):
        VARTrainer(experiment, tmp_path / "a", tokenizer=tokenizer_bundle, progress=False)


def test_tokenizer_resume_restores_gan_and_code_restart_state(tmp_path):
    experiment = tiny_experiment("tokenizer.train.steps=4", "tokenizer.train.checkpoint_every=2",
                                 "tokenizer.loss.gan_weight=0.1", "tokenizer.loss.restart_every=3")
    _interrupt_and_resume(lambda run, resume: TokenizerTrainer(experiment, run, resume=resume, progress=False),
                          tmp_path, "vqvae.safetensors")


# ---------------------------------------------------------------------------------------------------
# CoDe recipes
def test_distillation_kl_matches_the_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    for temperature in (1.0, 2.0):
        expected = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                            log_target=True, reduction="none").sum(-1) * temperature**2
        torch.testing.assert_close(distillation_kl(student, teacher, temperature), expected)
    assert distillation_kl(teacher, teacher).abs().max() < 1e-6


def _base_var_run(tmp_path, tokenizer_bundle) -> Path:
    run = tmp_path / "base"
    VARTrainer(tiny_experiment("var.train.steps=2"), run, tokenizer=tokenizer_bundle, progress=False).fit()
    return run


def test_code_drafter_trains_only_its_own_scales(tmp_path, tokenizer_bundle, shapes_batch):
    base = _base_var_run(tmp_path, tokenizer_bundle)
    trainer = VARTrainer(tiny_experiment("var.recipe.name=code-drafter", f"var.recipe.base={base}",
                                                 "var.recipe.draft_steps=2"), tmp_path / "drafter", progress=False)
    model = trainer.unwrap(trainer.model)
    torch.testing.assert_close(model.head.weight, load_model(base / "checkpoints" / "step_0000002", "var").head.weight)
    num_scales, weights = trainer.scales_and_weights()
    assert num_scales == 2 and weights.shape == (5,)  # 1 + 4 tokens
    images, labels = shapes_batch
    expected = _ce_on(model, trainer.tokenizer, images, labels, num_scales=2)
    model.config.cond_drop_rate = 0.0  # compare on the given labels
    with trainer.accelerator.accumulate(trainer.model):
        metrics = trainer.train_step(images.to(trainer.device), labels.to(trainer.device))
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="draft_steps must be in 1..3"):
        VARTrainer(tiny_experiment("var.recipe.name=code-drafter", f"var.recipe.base={base}"),
                           tmp_path / "bad", progress=False)


def test_code_refiner_distils_and_decays_the_drafted_scales(tmp_path, tokenizer_bundle, shapes_batch):
    base = _base_var_run(tmp_path, tokenizer_bundle)
    recipe = ["var.recipe.name=code-refiner", f"var.recipe.teacher={base}", "var.recipe.draft_steps=2",
              "var.recipe.stage1_fraction=0.5", "var.train.steps=20"]
    same = VARTrainer(tiny_experiment(*recipe, f"var.recipe.base={base}"), tmp_path / "same", progress=False)
    images, labels = shapes_batch
    with same.accelerator.accumulate(same.model):
        metrics = same.train_step(images.to(same.device), labels.to(same.device))
    assert metrics["kl"].item() < 1e-6  # a student equal to its teacher has nothing to learn

    smaller = VARTrainer(tiny_experiment(*recipe, "var.model.depth=1", "var.model.width=16"),
                                 tmp_path / "small", progress=False)
    assert smaller.unwrap(smaller.model).config.depth == 1 and smaller.teacher.config.depth == 2
    smaller.step = 5  # stage 1: every scale at full weight
    assert smaller.scales_and_weights()[1].tolist() == [1.0] * 30
    smaller.step = 15  # stage 2, half way: drafted scales (first 5 tokens) at 1 - 5/10
    weights = smaller.scales_and_weights()[1]
    assert weights[:5].tolist() == [0.5] * 5 and weights[5:].tolist() == [1.0] * 25
    smaller.step = 0
    first = smaller.fit()
    assert first["kl"] > 0
    with pytest.raises(ValueError, match="teacher"):
        VARTrainer(tiny_experiment("var.recipe.name=code-refiner", "var.recipe.draft_steps=2"),
                           tmp_path / "none", tokenizer=tokenizer_bundle, progress=False)
