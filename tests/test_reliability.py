"""Bad input as a user meets it, through the real CLI (in-process, tiny models built once per module).

* every bad value of a class (numbers out of range or of the wrong type, malformed overrides, missing or
  damaged files, mismatched models) exits non-zero with one line naming the problem, no traceback, and
  nothing written or changed on disk;
* a file that pickles code, given to any file argument of any command, never runs it;
* Ctrl-C at any moment of a grid write leaves the previous grid or the new one, never a partial file.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_pair
from PIL import Image
from test_train import TINY

from var.checkpoints import save_model
from var.cli import main
from var.eval.fidelity import write_random_inception_weights
from var.tokenizers.vqvae import VQVAE
from var.train.tokenizer import PREVIEW_IMAGES
from var.utils import save_grid

pytestmark = pytest.mark.usefixtures("one_thread")


class PlantedCode:
    """Unpickling this runs ``open(marker, "w")``: a file that appears proves the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Everything the cases point at: good models and runs, and damaged, mismatched or malicious files."""
    root = tmp_path_factory.mktemp("reliability")
    paths: dict[str, Path] = {"root": root, "marker": root / "code-ran"}
    vqvae, model = make_tiny_pair()
    paths["bundle"] = root / "bundle"
    save_model(vqvae, paths["bundle"], "vqvae")
    save_model(model, paths["bundle"], "var", tokenizer=vqvae)
    # the same transformer beside another tokenizer of the same shapes
    paths["other_tokenizer"] = root / "other_tokenizer"
    shutil.copytree(paths["bundle"], paths["other_tokenizer"])
    torch.manual_seed(1)
    save_model(VQVAE(vqvae.config), paths["other_tokenizer"], "vqvae")
    # a CoDe refiner trained on that other tokenizer
    paths["foreign_refiner"] = root / "foreign_refiner"
    save_model(model, paths["foreign_refiner"], "var", tokenizer=VQVAE(vqvae.config))
    # a run whose ``latest`` names a directory that is gone
    paths["stale_run"] = root / "stale_run"
    shutil.copytree(paths["bundle"], paths["stale_run"] / "checkpoints" / "step_0000002")
    (paths["stale_run"] / "checkpoints" / "latest").write_text("step_0000009\n")
    # a finished 2-step tokenizer run (through the CLI)
    paths["config"] = root / "tiny.yaml"
    paths["config"].write_text(yaml.safe_dump(TINY))
    paths["run"] = root / "run"
    main(["train-tokenizer", "--config", str(paths["config"]), "--out", str(paths["run"]), "--no-progress",
          "train.steps=2", "train.checkpoint_every=1"])
    paths["samples"] = root / "samples.npz"
    np.savez(paths["samples"], arr_0=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
    paths["inception"] = root / "inception.pth"
    write_random_inception_weights(paths["inception"])
    paths["not_inception"] = root / "not_inception.pth"
    torch.save({"weight": torch.zeros(2)}, paths["not_inception"])
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("data: [1, 2\n")
    paths["broken_images"] = root / "broken_images"
    for index in range(3):
        (paths["broken_images"] / "train" / "a").mkdir(parents=True, exist_ok=True)
        (paths["broken_images"] / "train" / "a" / f"{index}.png").write_bytes(b"not a png" * index)
    # malicious files: a torch zip, a raw pickle, and bundles / runs made of them
    marker = paths["marker"]
    paths["evil_pth"] = root / "evil.pth"
    torch.save({"weight": PlantedCode(marker)}, paths["evil_pth"])
    raw = pickle.dumps({"weight": PlantedCode(marker)})
    for name in ("evil.pkl", "evil.npz", "evil.json", "evil.yaml", "evil.safetensors"):
        (root / name).write_bytes(raw)
        paths[name.replace(".", "_")] = root / name
    paths["evil_bundle"] = root / "evil_bundle"
    shutil.copytree(paths["bundle"], paths["evil_bundle"])
    for name in ("vqvae.safetensors", "var.safetensors"):
        shutil.copy(paths["evil_pth"], paths["evil_bundle"] / name)
    paths["evil_run"] = root / "evil_run"
    shutil.copytree(paths["run"], paths["evil_run"])
    for file in (paths["evil_run"] / "checkpoints").glob("step_*/*"):
        shutil.copy(paths["evil_pth"] if file.suffix != ".pkl" else paths["evil_pkl"], file)
    pickle.loads(raw)  # the planted files do run code when unpickled unsafely ...
    assert marker.is_file()
    marker.unlink()  # ... which the cases below must never do
    return paths


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: its content hash and modification time."""
    return {str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file()}


def run_failing(argv: list[str], capsys) -> str:
    """Run the CLI expecting failure: non-zero exit, no traceback, exactly one error line; returns that line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    captured = capsys.readouterr()
    code = stop.value.code
    output = captured.out + captured.err + (f"{code}\n" if isinstance(code, str) else "")
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    return errors[0]


# (argv template, fragment the error line must contain); {name} is replaced by files[name]
BAD_INPUT = {
    # numbers: type and range, checked while parsing
    "temperature 0": ("sample --ckpt {bundle} --temperature 0", "temperature must be in (0, inf], got 0"),
    "top-p above 1": ("sample --ckpt {bundle} --top-p 2", "top_p must be in [0, 1]"),
    "top-k negative": ("sample --ckpt {bundle} --top-k -1", "top_k must be in [0, inf]"),
    "cfg nan": ("sample --ckpt {bundle} --cfg nan", "--cfg"),
    "batch size 0": ("sample --ckpt {bundle} --batch-size 0", "--batch-size: must be an integer >= 1, got 0"),
    "fractional batch size": ("sample --ckpt {bundle} --batch-size 2.5", "--batch-size: must be an integer"),
    "per-class 0": ("sample --ckpt {bundle} --per-class 0", "--per-class: must be an integer >= 1, got 0"),
    "fractional label": ("sample --ckpt {bundle} --labels 1.5", "--labels: must be an integer"),
    "label out of range": ("sample --ckpt {bundle} --labels 7", "label 7 is out of range"),
    "negative seed": ("sample --ckpt {bundle} --seed -1", "--seed: must be an integer"),
    "nrow 0": ("sample --ckpt {bundle} --nrow 0", "--nrow: must be an integer >= 1"),
    "unknown sampler": ("sample --ckpt {bundle} --sampler fast", "--sampler: invalid choice: 'fast'"),
    "kv budget 0": ("sample --ckpt {bundle} --sampler scalekv --kv-budget 0", "KV budget"),
    "option of another sampler": ("sample --ckpt {bundle} --sjd-window 4", "--sjd-window does not apply"),
    "eval per-class 0": ("eval --ckpt {bundle} --per-class 0", "--per-class: must be an integer >= 1"),
    "eval batch 0": ("eval --samples {samples} --eval-batch-size 0", "--eval-batch-size: must be an integer >= 1"),
    "eval bad sweep value": ("eval --ckpt {bundle} --sweep cfg=a,2", "--sweep cfg: cannot use"),
    "eval unknown sweep key": ("eval --ckpt {bundle} --sweep speed=1", "--sweep expects SETTING=V1,V2"),
    "calibrate budget 2": ("calibrate-kv --ckpt {bundle} --out {root}/b.json --kv-budget 2",
                           "--kv-budget: must be a number in (0, 1]"),
    "calibrate labels 0": ("calibrate-kv --ckpt {bundle} --out {root}/b.json --num-labels 0", "--num-labels"),
    "bench runs 0": ("bench --tiny --runs 0 --out {root}/bench", "--runs: must be an integer >= 1"),
    "bench batch 1.5": ("bench --tiny --batch-sizes 1.5 --out {root}/bench", "--batch-sizes: must be an integer"),
    "fractional draft steps": ("train --config {config} --draft-steps 1.5", "--draft-steps: must be an integer"),
    # overrides: parse errors and types name the key
    "fractional step count": ("train-tokenizer --config {config} --out {root}/new train.steps=2.5",
                              "'tokenizer.train.steps' expects an integer, got 2.5"),
    "negative step count": ("train-tokenizer --config {config} --out {root}/new train.steps=-5",
                            "tokenizer.train.steps must be an integer >= 0, got -5"),
    "list for a number": ("train-tokenizer --config {config} --out {root}/new train.optim.lr=[1,2]",
                          "'tokenizer.train.optim.lr' expects a number or null, got [1, 2]"),
    "text for an integer": ("train-tokenizer --config {config} --out {root}/new data.image_size=big",
                            "'data.image_size' expects an integer, got 'big'"),
    "malformed YAML value": ("train-tokenizer --config {config} --out {root}/new data.name=[1,",
                             "override data.name=[1,: the value is not valid YAML"),
    "unknown key": ("train-tokenizer --config {config} --out {root}/new train.stepz=3", "did you mean"),
    "no equals sign": ("train-tokenizer --config {config} --out {root}/new steps", "is not of the form key=value"),
    "section as a number": ("train-tokenizer --config {config} --out {root}/new train=5",
                            "expects a section (TrainConfig)"),
    "bad override on resume": ("train-tokenizer --out {run} --resume train.steps=-5",
                               "tokenizer.train.steps must be an integer >= 0"),
    "malformed config file": ("train-tokenizer --config {bad_yaml} --out {root}/new", "is not a YAML config"),
    "missing config file": ("train-tokenizer --config {root}/nope.yaml --out {root}/new", "not found"),
    # runs and files
    "resume a mistyped run": ("train-tokenizer --config {config} --out {root}/tpyo --resume", "is not a training run"),
    "new run over checkpoints": ("train-tokenizer --config {config} --out {run}", "already holds checkpoints"),
    "no readable image": ("train-tokenizer --config {config} --out {root}/new data.name=imagefolder "
                          "data.root={broken_images}", "none of the 3 image files"),
    "latest names a missing dir": ("sample --ckpt {stale_run}", "names step_0000009, which does not exist"),
    "missing checkpoint": ("sample --ckpt {root}/nope", "does not exist"),
    "unknown released model": ("sample --model var-d17", "unknown released model 'var-d17': did you mean"),
    "release and checkpoint": ("eval --model var-d16 --ckpt {bundle}", "is a whole released model"),
    "tokenizer run as a model": ("sample --ckpt {run}", "holds no 'var' checkpoint"),
    "one official file": ("sample --vae {evil_pth}", "pass a checkpoint directory (--ckpt) or both"),
    "another tokenizer": ("sample --ckpt {other_tokenizer}", "trained on another tokenizer"),
    "refiner on another tokenizer": ("sample --ckpt {bundle} --sampler code --refiner {foreign_refiner}",
                                     "trained on another tokenizer"),
    "missing budget file": ("sample --ckpt {bundle} --sampler scalekv --kv-budget {root}/nope.json", "not found"),
    "missing samples": ("eval --samples {root}/nope.npz", "is neither a samples .npz"),
    "samples and model": ("eval --samples {samples} --ckpt {bundle}", "pass either --samples"),
    "not the FID network": ("eval --samples {samples} --inception-weights {inception}",
                            "not the FID Inception weights"),
    "weights that are not Inception": ("eval --samples {samples} --inception-weights {not_inception} "
                                       "--allow-weights-mismatch --metrics is", "not_inception.pth"),
    "compare missing": ("compare {samples} {root}/nope.npz", "is neither a samples .npz"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_fails_in_one_line_and_writes_nothing(case, files, capsys, monkeypatch, tmp_path):
    template, fragment = BAD_INPUT[case]
    argv = template.format(**{name: str(path) for name, path in files.items()}).split()
    monkeypatch.chdir(tmp_path)  # default outputs (samples.png, out/eval, runs/...) would land here
    before = snapshot(files["root"])
    line = run_failing(argv, capsys)
    assert fragment in line, line
    assert line.startswith(f"var {argv[0]}: error: "), line
    assert snapshot(files["root"]) == before
    assert not any(tmp_path.iterdir())


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="trained on another tokenizer"):
        main(["sample", "--ckpt", str(files["other_tokenizer"]), "--debug"])


def test_force_tokenizer_pairs_another_tokenizer(files, tmp_path, capsys):
    main(["sample", "--ckpt", str(files["other_tokenizer"]), "--force-tokenizer", "--labels", "0",
          "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()


def test_an_override_the_checkpoint_rejects_leaves_the_run_untouched(files, capsys):
    before = snapshot(files["run"])
    line = run_failing(["train-tokenizer", "--out", str(files["run"]), "--resume", "--no-progress",
                        "train.steps=3", "model.ch=16"], capsys)
    assert "does not fit the model" in line, line
    assert snapshot(files["run"]) == before  # config.yaml still holds the settings that match the checkpoints


# (argv template) with malicious files in a file argument; {name} as above
PLANTED = {
    "sample --ckpt": "sample --ckpt {evil_bundle}",
    "sample --vae/--var": "sample --vae {evil_pth} --var {evil_pth}",
    "sample --refiner file": "sample --ckpt {bundle} --sampler code --refiner {evil_pth}",
    "sample --refiner bundle": "sample --ckpt {bundle} --sampler code --refiner {evil_bundle}",
    "sample --kv-budget": "sample --ckpt {bundle} --sampler scalekv --kv-budget {evil_json}",
    "eval --ckpt": "eval --ckpt {evil_bundle} --no-metrics",
    "eval --vae/--var": "eval --vae {evil_pth} --var {evil_pth} --no-metrics",
    "eval --samples": "eval --samples {evil_npz} --no-metrics",
    "eval --ref": "eval --samples {samples} --ref {evil_npz} --metrics fid --inception-weights {inception} "
                  "--allow-weights-mismatch --no-ref-cache",
    "eval --inception-weights": "eval --samples {samples} --inception-weights {evil_pth} --allow-weights-mismatch "
                                "--metrics is",
    "eval --extractor-weights": "eval --samples {samples} --extractor digits-classifier "
                                "--extractor-weights {evil_safetensors} --metrics is",
    "compare a": "compare {evil_npz} {samples}",
    "compare b": "compare {samples} {evil_npz}",
    "calibrate-kv --ckpt": "calibrate-kv --ckpt {evil_bundle} --out {root}/b.json",
    "calibrate-kv --vae/--var": "calibrate-kv --vae {evil_pth} --var {evil_pth} --out {root}/b.json",
    "train-tokenizer --config": "train-tokenizer --config {evil_yaml} --out {root}/new",
    "train-tokenizer --resume": "train-tokenizer --out {evil_run} --resume",
    "train --tokenizer": "train --config {config} --tokenizer {evil_bundle} --out {root}/new",
    "train --base": "train --config {config} --tokenizer {bundle} --base {evil_pth} --out {root}/new",
    "demo --config": "demo --config {evil_yaml} --out {root}/new",
    "train --config": "train --config {evil_yaml} --tokenizer {bundle} --out {root}/new",
    "train --teacher": "train --config {config} --tokenizer {bundle} --recipe code-refiner --teacher {evil_pth} "
                       "--draft-steps 2 --out {root}/new",
    "eval --refiner": "eval --ckpt {bundle} --sampler code --refiner {evil_pth} --no-metrics",
    "eval --kv-budget": "eval --ckpt {bundle} --sampler scalekv --kv-budget {evil_json} --no-metrics",
    "eval --ref config": "eval --samples {samples} --ref {evil_yaml} --metrics fid --inception-weights {inception} "
                         "--allow-weights-mismatch --no-ref-cache",
}


@pytest.mark.parametrize("case", PLANTED)
def test_a_file_that_pickles_code_never_runs_it(case, files, capsys, monkeypatch, tmp_path):
    argv = PLANTED[case].format(**{name: str(path) for name, path in files.items()}).split()
    monkeypatch.chdir(tmp_path)
    line = run_failing(argv, capsys)
    assert "evil" in line, line  # it failed on the planted file, not before
    assert not files["marker"].exists(), f"{case}: the planted pickle ran"


def test_ctrl_c_at_any_moment_of_a_grid_write_leaves_a_whole_grid(tmp_path):
    """SIGINT (Python's KeyboardInterrupt, delivered by a timer) at many offsets into ``save_grid``."""
    path = tmp_path / "grid.png"
    old = torch.zeros(64, 3, 32, 32)
    new = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_grid(old, path, nrow=8)
    old_bytes = path.read_bytes()
    start = time.perf_counter()
    save_grid(new, tmp_path / "reference.png", nrow=8)
    duration = time.perf_counter() - start
    new_bytes = (tmp_path / "reference.png").read_bytes()
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)  # the handler Ctrl-C runs
    interrupted = 0
    try:
        for step in range(40):
            path.write_bytes(old_bytes)
            try:
                signal.setitimer(signal.ITIMER_REAL, max(1e-5, duration * step / 32))
                save_grid(new, path, nrow=8)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                interrupted += 1
            assert path.read_bytes() in (old_bytes, new_bytes), f"partial grid at offset {step}"
            with Image.open(path) as image:
                image.verify()
            assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "reference.png"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted >= 10  # most offsets really landed inside the write


WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|savefig\(|save_image\(|torch\.save\(|np\.savez\(|save_file\(|"
                    r"Image\.\w+\(.*\)\.save\(|picture\.save\(")


def test_every_file_is_written_through_the_atomic_helper():
    """A write call in the package writes a temporary file handed out by ``atomic_write`` (``tmp``), a buffer,
    or into a checkpoint's temporary directory; nothing writes its final path in place."""
    package = Path(__file__).resolve().parents[1] / "var"
    in_place = [f"{path.relative_to(package.parent)}:{number}: {line.strip()}"
                for path in sorted(package.rglob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if WRITES.search(line) and not re.search(r"\btmp\b|\bhandle\b|buffer|temporary", line)]
    assert not in_place, "written in place (use var.utils.atomic_write):\n" + "\n".join(in_place)


def test_ctrl_c_while_sampling_says_nothing_was_written(files, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("var.sample.cli.sample_in_batches", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--ckpt", str(files["bundle"]), "--out", str(tmp_path / "grid.png")])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"var sample: interrupted while sampling: nothing was written ({tmp_path / 'grid.png'}" in err
    assert not any(tmp_path.iterdir())


def test_ctrl_c_in_a_sweep_names_the_finished_settings_and_the_rest(files, tmp_path, monkeypatch, capsys):
    from var.eval import cli as eval_cli

    evaluate = eval_cli.evaluate_setting

    def second_interrupted(args, name, value, *rest):
        if value == 2.0:
            raise KeyboardInterrupt
        return evaluate(args, name, value, *rest)

    monkeypatch.setattr(eval_cli, "evaluate_setting", second_interrupted)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--ckpt", str(files["bundle"]), "--per-class", "1", "--no-metrics", "--no-progress",
              "--sweep", "cfg=1,2,3", "--out", str(out)])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert (f"interrupted; finished settings (complete reports): {out / 'cfg_1.0'}; continue with the same command "
            "and --sweep cfg=2.0,3.0") in err
    assert (out / "cfg_1.0" / "report.json").is_file() and not (out / "cfg_2.0").exists()


def test_sample_grids_are_labelled_and_go_to_tensorboard(files, tmp_path):
    """Every ``sample_every``: a PNG whose rows say what they are, and the same grid as a TensorBoard image."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    main(["train-tokenizer", "--config", str(files["config"]), "--out", str(run), "--no-progress",
          "train.steps=2", "train.sample_every=1", "train.checkpoint_every=2"])
    grids = sorted((run / "samples").glob("*.png"))
    assert [grid.name for grid in grids] == ["step_0000001.png", "step_0000002.png"]
    with Image.open(grids[-1]) as image:
        pixels = np.asarray(image.convert("L"))
    strip = pixels.shape[1] - (PREVIEW_IMAGES * (64 + 2) + 2)  # beyond a bare row of 64 px tiles, 2 px apart
    assert strip > 40 and (pixels[:, :strip] < 128).any()  # a label strip with text in it
    events = next((run / "logs").rglob("events.out.tfevents.*")).parent
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    logged = accumulator.Images("samples")
    assert [event.step for event in logged] == [1, 2]
    assert (logged[-1].width, logged[-1].height) == (pixels.shape[1], pixels.shape[0])
