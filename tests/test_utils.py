import numpy as np
import torch
from PIL import Image

from var.utils import save_grid


def test_save_grid_enlarges_small_images_without_changing_pixels(tmp_path):
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    save_grid(images, tmp_path / "u8.png", nrow=3, padding=0)
    save_grid(images.float() / 255, tmp_path / "float.png", nrow=3, padding=0)
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "u8.png"))).permute(2, 0, 1)
    assert grid.shape == (3, 2 * 64, 3 * 64)  # 16 px tiles shown at 4x
    assert torch.equal(grid[:, :64:4, 64:128:4], images[1])  # nearest-neighbour: every pixel kept as is
    assert Image.open(tmp_path / "float.png").tobytes() == Image.open(tmp_path / "u8.png").tobytes()
    save_grid(torch.rand(2, 3, 64, 64), tmp_path / "large.png", nrow=2, padding=0)
    assert Image.open(tmp_path / "large.png").size == (128, 64)  # big enough images are left alone
