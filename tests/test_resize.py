"""How an image becomes the encoder's square input (downstream.decode.fit_square), on non-square images."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.config import FinetuneConfig
from medssl.downstream.decode import fit_square


def _wide() -> np.ndarray:
    """60 x 120: left half 0.2, right half 0.8, a bright column band at the far right (x 110-119)."""
    image = np.full((60, 120), 0.2, np.float32)
    image[:, 60:] = 0.8
    image[:, 110:] = 1.0
    return image


@pytest.mark.parametrize("mode", ["pad", "stretch", "crop"])
def test_every_mode_gives_the_square_size(mode):
    for shape in ((60, 120), (120, 60), (7, 300), (50, 50)):
        out = fit_square(np.random.default_rng(0).random(shape, dtype=np.float32), 32, mode)
        assert out.shape == (32, 32) and out.dtype == np.float32


def test_pad_keeps_the_whole_image_centred_between_bands_of_its_minimum():
    out = fit_square(_wide(), 40, "pad")
    assert np.all(out[:10] == 0.2) and np.all(out[30:] == 0.2)  # 60x120 -> 20x40, 10 rows of padding each side
    assert out[20, 2] == pytest.approx(0.2) and out[20, 30] == pytest.approx(0.8) and out[20, 39] == pytest.approx(1)


def test_stretch_fills_the_square_with_the_whole_image():
    out = fit_square(_wide(), 40, "stretch")
    assert out[0, 2] == pytest.approx(0.2) and out[39, 30] == pytest.approx(0.8)  # no padding rows
    assert out[20, 39] == pytest.approx(1.0)  # the right edge band survives


def test_crop_keeps_the_centre_and_loses_the_far_edges():
    out = fit_square(_wide(), 40, "crop")  # 60x120 -> 40x80, columns 20-59 kept
    assert out[0, 2] == pytest.approx(0.2) and out[0, 37] == pytest.approx(0.8)
    assert out.max() < 1.0  # the band at the far right is cut away


def test_a_tall_image_is_cropped_vertically():
    tall = _wide().T.copy()  # 120 x 60, the band at the bottom
    assert fit_square(tall, 40, "crop").max() < 1.0 and fit_square(tall, 40, "pad")[39, 20] == pytest.approx(1.0)


def test_resize_is_a_task_setting_checked_at_load():
    assert FinetuneConfig().resize == "pad"
    with pytest.raises(ValueError, match="resize"):
        FinetuneConfig.model_validate({"resize": "squash"})
    with pytest.raises(ValueError, match="unknown resize mode"):
        fit_square(_wide(), 8, "squash")
