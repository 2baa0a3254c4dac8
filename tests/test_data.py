import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from var.data import DataConfig, ImageFolderDataset, build_dataset, official_transform
from var.train.data import ResumableBatchSampler, SeededItems


def _write_image(path, size=(20, 14), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def image_tree(tmp_path):
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            for i in range(3):
                _write_image(tmp_path / split / name / f"{i}.png", value=40 + 100 * label)
    # two broken files in the training split: random bytes, and a PNG cut in half
    (tmp_path / "train" / "cat" / "garbage.jpg").write_bytes(b"\x00not an image at all" * 10)
    good = (tmp_path / "train" / "dog" / "0.png").read_bytes()
    (tmp_path / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return tmp_path


def test_imagefolder_skips_corrupt_images_with_one_warning_each(image_tree):
    dataset = ImageFolderDataset(image_tree, "train", image_size=8)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
        items += [dataset[i] for i in range(len(dataset))]  # a second epoch: no new warnings
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert any("garbage.jpg" in m for m in messages) and any("truncated.png" in m for m in messages)
    for image, label in items:
        assert image.shape == (3, 8, 8) and label in (0, 1)
        assert image.min() >= -1 and image.max() <= 1


def test_imagefolder_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class name>"):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(DataConfig(name="imagefolder"))
    with pytest.raises(ValueError, match="choose one of"):
        build_dataset(DataConfig(name="cifar"))


def test_official_transform_resizes_crops_and_scales():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    val = official_transform(16, train=False)
    out = val(image)
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, val(image))  # center crop is deterministic
    # the resize step: shorter side -> round(1.125 * 16) = 18 with LANCZOS
    resize = val.transforms[0]
    assert resize.size == 18 and resize.interpolation.value == "lanczos"
    torch.manual_seed(0)
    crops = {tuple(official_transform(16, train=True)(image).flatten()[:8].tolist()) for _ in range(6)}
    assert len(crops) > 1  # random crops differ


def test_build_dataset_registry(image_tree):
    digits = build_dataset(DataConfig(name="digits", image_size=16), "val")
    assert digits.num_classes == 10 and digits[0][0].shape == (3, 16, 16)
    shapes = build_dataset(DataConfig(name="shapes", image_size=16, num_samples=10))
    assert len(shapes) == 10
    folder = build_dataset(DataConfig(name="imagefolder", root=str(image_tree), image_size=8), "val")
    assert folder.num_classes == 2 and len(folder) == 6


def test_resumable_sampler_resumes_exactly_and_shards_disjointly():
    full = iter(ResumableBatchSampler(50, 4, seed=3))
    sequence = [next(full) for _ in range(30)]  # crosses several epochs
    resumed = iter(ResumableBatchSampler(50, 4, seed=3, start=17))
    assert [next(resumed) for _ in range(13)] == sequence[17:]
    ranks = [next(iter(ResumableBatchSampler(50, 4, seed=3, rank=r, world_size=2))) for r in range(2)]
    assert not {i for _, i in ranks[0]} & {i for _, i in ranks[1]}
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler(3, 4, seed=0)


def test_seeded_items_make_augmentation_repeatable_without_touching_the_training_rng(image_tree):
    dataset = SeededItems(ImageFolderDataset(image_tree, "train", image_size=8))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = dataset[(77, 1)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, dataset[(77, 1)][0])
