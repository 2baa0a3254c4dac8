"""Multi-process training and evaluation under ``accelerate launch`` on CPU (gloo), as a user runs them.

Every launch is a real ``accelerate launch --multi_gpu --num_processes 2`` of the var CLI with
ACCELERATE_USE_CPU=1 (tiny models, a few steps; each launch costs ~15 s of CPU, mostly imports): checkpoints
written once with every process's RNG state, exact resume after SIGKILL, logged metrics averaged over the
processes, the two launch traps, and sharded feature extraction in ``var eval``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import make_tiny_pair
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import TINY

from var.checkpoints import save_model
from var.cli import main
from var.config import load_experiment
from var.eval.classifier import DigitClassifier, save_digit_classifier
from var.eval.images import Samples, save_pngs
from var.loading import load_one
from var.train.var_trainer import VARTrainer

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]
TWO_PROCESSES = [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
VAR_STEPS, VAR_CHECKPOINT_EVERY, LOG_EVERY = 12, 4, 3
RANK_FILES = {"random_states_0.pkl", "random_states_1.pkl"}


def launch_env(cpu: bool = True) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def launch(*args: str, launcher: list[str] = TWO_PROCESSES, cpu: bool = True) -> str:
    """Run ``launcher -m var.cli ARGS`` (or a script path as first arg); returns its output, asserting success."""
    program = list(args) if args[0].endswith(".py") else ["-m", "var.cli", *args]
    finished = subprocess.run([*launcher, *program], cwd=REPO, env=launch_env(cpu), capture_output=True,
                              text=True, timeout=300)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    return output


def kill_after_first_checkpoint(*args: str) -> str:
    """Launch ``var ARGS`` on two processes and SIGKILL the launcher and both workers once a checkpoint is saved."""
    process = subprocess.Popen([*TWO_PROCESSES, "-m", "var.cli", *args], cwd=REPO, env=launch_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "saved checkpoint" in line:
            workers = psutil.Process(process.pid).children(recursive=True)  # torchrun starts them in new sessions
            for worker in workers:
                worker.kill()
            process.kill()
            psutil.wait_procs(workers, timeout=60)
            break
    process.wait(timeout=60)
    assert process.returncode == -9, "the run finished before it could be killed:\n" + "".join(output)[-3000:]
    return "".join(output)


def assert_written_once(run: Path, output: str, steps: list[int], models: set[str]) -> None:
    """Each checkpoint committed once (one 'saved' line), holding both processes' RNG states, nothing left over."""
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", *(f"step_{s:07d}" for s in steps)]
    for step in steps:
        assert output.count(f"saved checkpoint {checkpoints / f'step_{step:07d}'}\n") == 1
        files = {p.name for p in (checkpoints / f"step_{step:07d}").iterdir()}
        bundle = {f"{name}.{ext}" for name in models for ext in ("json", "safetensors")}
        assert files == bundle | RANK_FILES | {"optimizer.bin", "training_state.pt"}
    state = torch.load(checkpoints / f"step_{steps[-1]:07d}" / "training_state.pt", weights_only=True)
    assert state["num_processes"] == 2 and state["effective_batch"] == 32
    repeated = [line for line, count in collections.Counter(output.splitlines()).items()
                if count > 1 and "Warning" in line]
    assert not repeated, f"warnings printed by every process: {repeated}"


def assert_same_weights(a: Path, b: Path) -> None:
    expected, actual = load_file(a), load_file(b)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


TOKENIZER_OVERRIDES = ["train.steps=9", "train.checkpoint_every=3", "loss.restart_every=2"]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, config) -> tuple[Path, str]:
    """An uninterrupted 2-process tokenizer run: 9 steps, checkpoints at 3, 6, 9, dead codes restarted at steps
    2 and 4 (the first restart's counts span the checkpoint at 3)."""
    run = tmp_path_factory.mktemp("tokenizer") / "run"
    output = launch("train-tokenizer", "--config", str(config), "--out", str(run), "--no-progress",
                    *TOKENIZER_OVERRIDES)
    return run, output


def test_two_process_tokenizer_resumes_exactly_after_sigkill(tokenizer_run, tmp_path, config):
    straight, output = tokenizer_run
    assert "2 process(es) on cpu" in output
    assert_written_once(straight, output, [3, 6, 9], {"vqvae"})
    killed = tmp_path / "killed"
    kill_after_first_checkpoint("train-tokenizer", "--config", str(config), "--out", str(killed), "--no-progress",
                                *TOKENIZER_OVERRIDES)
    load_one(killed, "vqvae")  # whatever the kill interrupted, latest is a complete bundle
    interrupted_at = int((killed / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert interrupted_at in (3, 6)
    output = launch("train-tokenizer", "--out", str(killed), "--resume", "--no-progress")
    assert f"at step {interrupted_at}" in output
    final = "checkpoints/step_0000009/vqvae.safetensors"
    assert_same_weights(straight / final, killed / final)  # code restarts too: their counts span both processes


def test_two_process_var_logs_the_mean_over_processes(tokenizer_run, tmp_path, config):
    tokenizer, _ = tokenizer_run
    run, records = tmp_path / "run", tmp_path / "records"
    output = launch(str(REPO / "tests" / "rank_metrics.py"), str(records), "train", "--config", str(config),
                    "--tokenizer", str(tokenizer), "--no-progress", "--out", str(run), f"train.steps={VAR_STEPS}",
                    f"train.checkpoint_every={VAR_CHECKPOINT_EVERY}", f"train.log_every={LOG_EVERY}",
                    "train.keep_checkpoints=2", "model.drop_path_rate=0.05")
    assert_written_once(run, output, [8, 12], {"vqvae", "var"})

    # the logged loss and accuracy are the means over both processes (each saw different batches)
    per_rank = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(steps) for steps in per_rank] == [VAR_STEPS, VAR_STEPS]
    events = EventAccumulator(str(run / "logs" / "var"))
    events.Reload()
    for metric in ("loss", "acc"):
        logged = {event.step: event.value for event in events.Scalars(metric)}
        assert sorted(logged) == list(range(LOG_EVERY, VAR_STEPS + 1, LOG_EVERY))
        rank_zero_gap = 0.0
        for step, value in logged.items():
            window = [[steps[i][metric] for i in range(step - LOG_EVERY, step)] for steps in per_rank]
            means = [sum(values) / LOG_EVERY for values in window]
            assert value == pytest.approx(sum(means) / 2, rel=1e-5, abs=1e-7)
            rank_zero_gap = max(rank_zero_gap, abs(means[0] - value))
        assert rank_zero_gap > 1e-4  # the processes' values differ: logging rank 0 alone would fail above

    # resuming on another number of processes says what that changes
    shutil.rmtree(run / "checkpoints" / f"step_{VAR_STEPS:07d}")
    (run / "checkpoints" / "latest").write_text("step_0000008\n")
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1: effective batch 32 -> 16, "
                                         r"peak lr 0.003 unchanged; data order"):
        VARTrainer(load_experiment(run / "config.yaml"), run, resume=True, progress=False)


@pytest.mark.parametrize("launcher, cpu", [
    (["--cpu", "--num_processes", "2"], False),  # accelerate's simple launcher: one process
    (["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"], False),  # no GPU, no ACCELERATE_USE_CPU
])
def test_launch_traps_stop_with_one_line_and_write_nothing(tmp_path, config, launcher, cpu):
    run = tmp_path / "run"
    finished = subprocess.run([*LAUNCH, *launcher, "-m", "var.cli", "train-tokenizer", "--config", str(config),
                               "--out", str(run), "--no-progress"],
                              cwd=REPO, env=launch_env(cpu), capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0
    errors = [line for line in (finished.stdout + finished.stderr).splitlines()
              if line.startswith("var train-tokenizer: error:")]
    assert len(errors) == 1, finished.stdout + finished.stderr
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes" in errors[0]
    assert "nothing was written" in errors[0]
    assert not run.exists()


def test_two_process_eval_shards_feature_extraction(tmp_path, monkeypatch):
    """Samples (a tensor on the main process, scattered) and a folder reference (read by every process)."""
    monkeypatch.setenv("VAR_CACHE_DIR", str(tmp_path / "cache"))
    vqvae, model = make_tiny_pair(seed=0)
    bundle, judge, reference = tmp_path / "bundle", tmp_path / "judge.safetensors", tmp_path / "reference"
    save_model(vqvae, bundle)
    save_model(model, bundle)
    torch.manual_seed(0)
    save_digit_classifier(DigitClassifier(), judge)
    generator = torch.Generator().manual_seed(0)
    save_pngs(reference, Samples(torch.randint(0, 256, (11, 3, 8, 8), generator=generator, dtype=torch.uint8)))
    common = ["eval", "--ckpt", str(bundle), "--device", "cpu", "--per-class", "3", "--batch-size", "2",
              "--extractor", "digits-classifier", "--extractor-weights", str(judge), "--ref", str(reference),
              "--eval-batch-size", "4", "--no-ref-cache", "--no-progress"]
    main([*common, "--out", str(tmp_path / "one")])
    output = launch(*common, "--out", str(tmp_path / "two"), cpu=False)
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert two["sampling"]["num_processes"] == 2
    # 9 samples in batches of 4: process 0 extracts batches 0 and 2 (4 + 1), process 1 batch 1; the reference's
    # 11 images likewise 4 + 3 and 4
    assert one["metrics"].pop("extraction_shares") == [9]
    assert two["metrics"].pop("extraction_shares") == [5, 4]
    assert two["evaluation"]["reference_loaded"][0]["extraction_shares"] == [7, 4]
    for report in (one, two):
        for timing in ("extraction_s", "extraction_images_per_s"):
            report["metrics"].pop(timing)
    assert {"fid", "kid", "precision", "is", "class_consistency"} <= one["metrics"].keys()
    assert two["metrics"] == one["metrics"]  # the same numbers, bit for bit
    assert output.count(f"{tmp_path / 'two'}: 9 samples") == 1
