"""Image figures: grey and colour mosaics in the channel-first flat layout, any image size."""

import numpy as np
import torch
from PIL import Image

from pyro_vae import plots


def test_grey_mosaic_accepts_old_and_new_shapes():
    images = torch.rand(5, 12)
    old, new = plots.mosaic(images, (3, 4), ncol=3), plots.mosaic(images, (1, 3, 4), ncol=3)
    assert old.shape == new.shape == (2 * 4 - 1, 3 * 5 - 1) and np.array_equal(old, new)
    assert np.allclose(new[:3, 5:9], images[1].view(3, 4).numpy()) and new[3, 0] == 0.25


def test_colour_mosaic_keeps_the_channels(tmp_path):
    x = torch.zeros(4, 3, 5, 7)
    x[:, 0] = 1.0  # red
    x[3, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # one blue pixel
    grid = plots.mosaic(x.reshape(4, -1), (3, 5, 7), ncol=2)
    assert grid.shape == (11, 15, 3) and np.array_equal(grid[0, 0], [1.0, 0.0, 0.0])
    assert np.array_equal(grid[6, 8], [0.0, 0.0, 1.0]) and np.array_equal(grid[5, 0], [0.75] * 3)
    path = plots.image_grid(x.reshape(4, -1), (3, 5, 7), tmp_path / "colour.png", title="colour")
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    reddish = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    assert reddish.sum() > 100  # drawn in colour, not through a grey colormap


def test_reconstructions_of_colour_images(tmp_path):
    x = torch.rand(6, 3 * 6 * 6)
    path = plots.reconstructions(x, x.flip(0), (3, 6, 6), tmp_path / "recon.png", ncol=3)
    assert path.is_file()
