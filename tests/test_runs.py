"""Training runs as a user meets them: start-up checks, precision, EMA, checkpoint state, damaged checkpoints,
mistyped run directories, rejected overrides and Ctrl-C (all in-process, tiny models)."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import make_tiny_pair
from safetensors.torch import load_file
from test_train import TINY, _interrupt_and_resume, tiny_experiment

from var.cli import main
from var.distributed import LaunchError, check_launch, launch_problem, quiet_other_processes
from var.train.loop import exponential_moving_average, resolve_precision
from var.train.tokenizer import TokenizerTrainer

LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU",
                    "ACCELERATE_MIXED_PRECISION", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def one_thread_and_no_launcher(monkeypatch):
    """One intra-op thread (tiny models), and none of a launcher's variables from the calling shell."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def fails_with(argv: list[str], *fragments: str) -> str:
    """Run the CLI, expect the one-line error naming every fragment; returns it."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.count("\n") == 0 and message.startswith("var ") and "error:" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- launch and precision ------------------------------------------------------------------------------------
def test_launch_problems_are_named_with_the_command_to_use(monkeypatch):
    assert launch_problem(1) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_problem(2) is None
    assert "each runs alone (accelerate found no GPU" in launch_problem(1)  # --multi_gpu on a CPU machine
    with pytest.raises(LaunchError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2"):
        check_launch(1)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:  # the other processes leave the explanation to process 0
        check_launch(1)
    assert stop.value.code == 1
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name)
    assert "WORLD_SIZE says 1" in launch_problem(2)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what ``accelerate launch --cpu --num_processes 2`` sets
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "--cpu starts ONE process" in launch_problem(1)


def test_warnings_show_on_the_main_process_only():
    for is_main, expected in ((True, 1), (False, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_other_processes(is_main)
            warnings.warn("once", UserWarning, stacklevel=1)
        assert len(caught) == expected


def test_precision_the_config_wins_only_when_set(monkeypatch, tmp_path, capsys):
    assert resolve_precision(None, "tokenizer.train")[0] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert resolve_precision(None, "tokenizer.train") == ("bf16", "accelerate launch --mixed_precision")
    assert resolve_precision("no", "tokenizer.train") == (
        "no", "tokenizer.train.mixed_precision, which overrides the launcher's bf16")
    trainer = TokenizerTrainer(tiny_experiment(), tmp_path / "run", progress=False)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert "mixed precision bf16 (accelerate launch --mixed_precision)" in capsys.readouterr().out
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match="--mixed_precision fp8 is not supported"):
        resolve_precision(None, "var.train")


# -- library parts ---------------------------------------------------------------------------------------------
def test_timm_ema_equals_the_previous_hand_written_update():
    """The numerics of Trainer.update_ema before timm: float tensors lerp by 1 - decay, others are copied."""
    vqvae, model = make_tiny_pair()
    for trained in (model, vqvae):
        expected = {key: value.clone() for key, value in trained.state_dict().items()}
        ema = exponential_moving_average(trained, decay=0.9)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(5):
                for parameter in trained.parameters():  # an optimizer step, as far as the average can tell
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
                ema.update(trained)
                for key, value in trained.state_dict().items():
                    if value.dtype.is_floating_point:
                        expected[key].lerp_(value.to(expected[key].dtype), 1 - 0.9)
                    else:
                        expected[key].copy_(value)
        for key, value in ema.module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
        assert not any(p.requires_grad for p in ema.parameters())


def test_accelerate_state_restores_every_random_generator(tmp_path):
    """accelerate swallows a failed RNG load ('Could not load random states'): exact resume rests on this."""
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    accelerator.save_state(str(tmp_path / "state"))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    accelerator.load_state(str(tmp_path / "state"))
    drawn = (random.random(), np.random.rand(), torch.rand(3))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling (accelerate's scaler.pt) needs CUDA")
def test_fp16_resume_restores_the_loss_scale_and_takes_a_bf16_checkpoint(tmp_path):
    def experiment(precision: str, steps: int = 4):
        return tiny_experiment(f"tokenizer.train.steps={steps}", "tokenizer.train.checkpoint_every=2",
                               f"tokenizer.train.mixed_precision={precision}")

    _interrupt_and_resume(lambda run, resume: TokenizerTrainer(experiment("fp16"), run, resume=resume,
                                                               progress=False), tmp_path, "vqvae.safetensors")
    scalers = [torch.load(tmp_path / run / "checkpoints" / "step_0000004" / "scaler.pt", weights_only=True)
               for run in ("a", "b")]
    assert scalers[0]["_growth_tracker"] == 4 and scalers[1] == scalers[0]  # counted on from the checkpoint
    TokenizerTrainer(experiment("bf16", steps=2), tmp_path / "c", progress=False).fit()
    resumed = TokenizerTrainer(experiment("fp16"), tmp_path / "c", resume=True, progress=False)  # no scaler.pt
    assert resumed.step == 2
    resumed.fit()


# -- start-up checks: nothing written ----------------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("train.steps=2.5", "config key 'tokenizer.train.steps' expects an integer, got 2.5"),
    ("train.steps=-5", "tokenizer.train.steps must be an integer >= 0, got -5"),
    ("train.steps=0", "set tokenizer.train.steps (optimizer steps) or tokenizer.train.epochs to a positive number"),
    ("train.batch_size=0", "tokenizer.train.batch_size must be an integer >= 1"),
])
def test_bad_step_counts_are_rejected_before_anything_is_written(tmp_path, config, override, expected):
    fails_with(["train-tokenizer", "--config", str(config), "--out", str(tmp_path / "run"), override], expected)
    assert not (tmp_path / "run").exists()


def test_resume_needs_an_existing_run(tmp_path, config):
    fails_with(["train-tokenizer", "--config", str(config), "--out", str(tmp_path / "tpyo"), "--resume"],
               "is not a training run", "drop --resume to start a new run")
    assert not (tmp_path / "tpyo").exists()


@pytest.fixture
def tokenizer_run(tmp_path, config) -> Path:
    """4 tokenizer steps with checkpoints at 2 and 4, through the CLI."""
    run = tmp_path / "run"
    main(["train-tokenizer", "--config", str(config), "--out", str(run), "--no-progress", "train.steps=4",
          "train.checkpoint_every=2"])
    return run


def test_a_rejected_override_on_resume_leaves_the_run_untouched(tokenizer_run):
    before = {path: path.read_bytes() for path in tokenizer_run.rglob("*") if path.is_file()}
    for override, message in (("train.steps=-5", "tokenizer.train.steps must be an integer >= 0, got -5"),
                              ("train.steps=7.5", "'tokenizer.train.steps' expects an integer, got 7.5")):
        fails_with(["train-tokenizer", "--out", str(tokenizer_run), "--resume", "--no-progress", override], message)
    assert {path: path.read_bytes() for path in tokenizer_run.rglob("*") if path.is_file()} == before
    main(["train-tokenizer", "--out", str(tokenizer_run), "--resume", "--no-progress", "train.steps=6"])
    assert yaml.safe_load((tokenizer_run / "config.yaml").read_text())["tokenizer"]["train"]["steps"] == 6


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated training state": (lambda step: _truncate(step / "training_state.pt"),
                                 "step_0000004 has an unreadable training_state.pt"),
    "truncated weights": (lambda step: _truncate(step / "vqvae.safetensors"),
                          "step_0000004 has a damaged vqvae.safetensors"),
    "missing optimizer state": (lambda step: (step / "optimizer.bin").unlink(),
                                "step_0000004 is missing optimizer.bin"),
    "missing RNG state": (lambda step: (step / "random_states_0.pkl").unlink(),
                          "step_0000004 is missing random_states_0.pkl"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tokenizer_run, damage, capsys):
    final = tokenizer_run / "checkpoints" / "step_0000004"
    uninterrupted = {key: value.clone() for key, value in load_file(final / "vqvae.safetensors").items()}  # no mmap
    spoil, message = DAMAGE[damage]
    spoil(final)
    capsys.readouterr()
    main(["train-tokenizer", "--out", str(tokenizer_run), "--resume", "--no-progress"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("step_0000004"))
    assert line.startswith(message)
    assert line.endswith("(named by checkpoints/latest): resuming from step_0000002, the newest complete checkpoint")
    for key, value in load_file(final / "vqvae.safetensors").items():  # retrained from step 2: the same weights
        assert torch.equal(value, uninterrupted[key]), key


def test_latest_naming_a_missing_directory_says_so(tokenizer_run, capsys):
    (tokenizer_run / "checkpoints" / "latest").write_text("step_0000009\n")
    capsys.readouterr()
    main(["train-tokenizer", "--out", str(tokenizer_run), "--resume", "--no-progress"])
    assert ("step_0000009 does not exist (named by checkpoints/latest): resuming from step_0000004"
            in capsys.readouterr().out)
    for step in ("step_0000004", "step_0000002"):
        _truncate(tokenizer_run / "checkpoints" / step / "training_state.pt")
    fails_with(["train-tokenizer", "--out", str(tokenizer_run), "--resume"], "no complete checkpoint in",
               "step_0000009 does not exist", "step_0000002 has an unreadable training_state.pt")


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, config, monkeypatch, capsys):
    run = tmp_path / "run"
    step = TokenizerTrainer.train_step

    def interrupted_at_step_3(self, images, labels):
        if self.step == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a step
        return step(self, images, labels)

    monkeypatch.setattr(TokenizerTrainer, "train_step", interrupted_at_step_3)
    with pytest.raises(SystemExit) as stop:
        main(["train-tokenizer", "--config", str(config), "--out", str(run), "--no-progress", "train.steps=6",
              "train.checkpoint_every=2"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"var train-tokenizer: interrupted at step 3 of 6; the last checkpoint is "
            f"{run / 'checkpoints' / 'step_0000002'}; continue with: var train-tokenizer --out {run} --resume") in err
    monkeypatch.setattr(TokenizerTrainer, "train_step", step)
    main(["train-tokenizer", "--out", str(run), "--resume", "--no-progress"])  # the printed command works
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    shutil.rmtree(run)
