"""gvbsm_hf.visualize.save_class_grid: layout and cell pixels of the written PNG."""

import numpy as np
import pytest
import torch
from PIL import Image

from gvbsm_hf.errors import GVBSMError
from gvbsm_hf.visualize import GRID_PAD, save_class_grid


def _cell(grid: np.ndarray, row: int, col: int, ch: int, cw: int, cols: int) -> np.ndarray:
    """Cell (row, col): cells are right-aligned, GRID_PAD apart and around."""
    x0 = grid.shape[1] - GRID_PAD - cols * (cw + GRID_PAD) + col * (cw + GRID_PAD)
    y0 = GRID_PAD + row * (ch + GRID_PAD)
    return grid[y0 : y0 + ch, x0 : x0 + cw]


def test_uint8_rgb_grid_layout_and_pixels(tmp_path):
    images = torch.randint(0, 256, (7, 3, 8, 6), dtype=torch.uint8)
    labels = torch.tensor([0, 2, 0, 2, 2, 0, 0])
    names = ["cat", "empty class", "dog"]
    path = save_class_grid(images, labels, names, tmp_path / "sub" / "grid.png", max_per_class=3, scale=5)
    assert path.exists()
    img = Image.open(path)
    assert img.format == "PNG"
    grid = np.asarray(img.convert("RGB"))
    ch, cw, cols, rows = 8 * 5, 6 * 5, 3, 3  # max(min(4, 3), 3) columns, one row per class name
    assert grid.shape[0] == rows * (ch + GRID_PAD) + GRID_PAD
    label_w = grid.shape[1] - GRID_PAD - cols * (cw + GRID_PAD)
    assert label_w > 20  # room for the class names
    per_class = {0: [0, 2, 5], 2: [1, 3, 4]}  # first max_per_class images of each class, in order
    for r, idx in per_class.items():
        for c, i in enumerate(idx):
            expected = images[i].permute(1, 2, 0).numpy().repeat(5, axis=0).repeat(5, axis=1)
            assert np.array_equal(_cell(grid, r, c, ch, cw, cols), expected)
    # the empty class's row has no image, but every row has its name written at the left
    assert (_cell(grid, 1, 0, ch, cw, cols) == 255).all()
    for r in range(rows):
        band = grid[GRID_PAD + r * (ch + GRID_PAD) : GRID_PAD + r * (ch + GRID_PAD) + ch, :label_w]
        assert (band < 128).any(), f"no text in row {r}"


def test_float_grayscale_default_upscale(tmp_path):
    images = torch.rand(4, 1, 16, 16)
    labels = torch.tensor([1, 0, 1, 1])
    path = save_class_grid(images, labels, ["a", "b"], tmp_path / "g.png", max_per_class=2)
    grid = np.asarray(Image.open(path).convert("RGB"))
    s = 4  # 16 px -> about 64 px
    ch = cw = 16 * s
    assert grid.shape[0] == 2 * (ch + GRID_PAD) + GRID_PAD
    u8 = (images * 255).round().to(torch.uint8)
    for r, c, i in ((0, 0, 1), (1, 0, 0), (1, 1, 2)):
        expected = u8[i, 0].numpy().repeat(s, 0).repeat(s, 1)
        cell = _cell(grid, r, c, ch, cw, 2)
        assert np.array_equal(cell[..., 0], expected) and np.array_equal(cell[..., 2], expected)


def test_bad_labels_name_the_fix(tmp_path):
    with pytest.raises(GVBSMError, match="class names"):
        save_class_grid(torch.rand(2, 3, 4, 4), torch.tensor([0, 5]), ["a", "b"], tmp_path / "x.png")
