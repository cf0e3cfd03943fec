import numpy as np
import pytest
import torch

from medssl.config import MultiCropConfig
from medssl.data.augment import MultiCrop

# Geometry only: one full-image crop, no intensity change, so outputs can be compared to inputs.
PLAIN = dict(n_global=1, global_size=64, global_scale=(1.0, 1.0), n_local=0, aspect_ratio=(1.0, 1.0),
             rotation=(0.0, 0.0), scale_jitter=(1.0, 1.0), hflip_prob=0.0, vflip_prob=0.0,
             gamma_prob=0.0, contrast=0.0, brightness=0.0, blur_prob=0.0, noise_prob=0.0)


def ct_slice(size=256, seed=0):
    """Air around a soft-tissue disc with a bone ring, in HU."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    r = np.hypot(yy, xx)
    hu = np.where(r < 0.4, 40.0, -1000.0)
    hu[(r > 0.3) & (r < 0.33)] = 1000.0
    return (hu + np.random.default_rng(seed).normal(0, 10, hu.shape)).astype(np.float32)


def asymmetric_pattern(size=64):
    """An L shape: a bright left column and a bright bottom row, nothing else."""
    img = np.zeros((size, size), np.float32)
    img[8:56, 8:16] = 1.0
    img[48:56, 8:40] = 1.0
    return img


@pytest.mark.parametrize("preset, sizes", [("swav", [224] * 2 + [96] * 6), ("cpu", [96] * 2 + [48] * 4)])
def test_presets_give_global_crops_first_then_local_crops(preset, sizes):
    crops = MultiCrop(MultiCropConfig.preset(preset), seed=0)(ct_slice(), "hounsfield")
    assert [c.shape for c in crops] == [(1, s, s) for s in sizes]
    assert all(c.dtype == torch.float32 for c in crops)


def test_unknown_preset_and_bad_ranges_are_clear_errors():
    with pytest.raises(ValueError, match="unknown multi-crop preset"):
        MultiCropConfig.preset("imagenet")
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropConfig(local_scale=(0.3, 0.1))
    with pytest.raises(ValueError, match="semantics"):
        MultiCrop(seed=0)(ct_slice(), "rgb")


@pytest.mark.parametrize("semantics", ["hounsfield", "normalized"])
def test_outputs_are_finite_and_in_display_range(semantics):
    image = ct_slice(seed=1)
    if semantics == "normalized":
        image = (image - image.min()) / (image.max() - image.min())
    augment = MultiCrop(MultiCropConfig.preset("cpu"), seed=3)
    crops = [crop for _ in range(10) for crop in augment(image, semantics)]
    for crop in crops:
        assert torch.isfinite(crop).all()
        assert crop.min() >= 0 and crop.max() <= 1
    # A narrow window over uniform tissue may saturate a crop, but most crops show structure.
    assert np.mean([crop.std().item() > 0.01 for crop in crops]) > 0.8


def test_non_square_input_and_torch_input():
    image = torch.from_numpy(ct_slice(256)[:, :160].copy())
    crops = MultiCrop(MultiCropConfig.preset("cpu"), seed=0)(image, "hounsfield")
    assert len(crops) == 6 and all(torch.isfinite(c).all() for c in crops)


def test_full_image_crop_without_changes_is_the_identity():
    image = asymmetric_pattern()
    (crop,) = MultiCrop(MultiCropConfig(**PLAIN), seed=0)(image, "normalized")
    assert torch.allclose(crop[0], torch.from_numpy(image), atol=1e-5)


def test_rotation_rotates():
    image = asymmetric_pattern()
    (crop,) = MultiCrop(MultiCropConfig(**{**PLAIN, "rotation": (90.0, 90.0)}), seed=0)(image, "normalized")
    rotated = torch.rot90(torch.from_numpy(image), k=1, dims=(0, 1))
    assert torch.allclose(crop[0], rotated, atol=1e-4)
    assert not torch.allclose(crop[0], torch.from_numpy(image), atol=0.1)


def test_horizontal_flip_mirrors():
    image = asymmetric_pattern()
    (crop,) = MultiCrop(MultiCropConfig(**{**PLAIN, "hflip_prob": 1.0}), seed=0)(image, "normalized")
    assert torch.allclose(crop[0], torch.from_numpy(image[:, ::-1].copy()), atol=1e-5)


def test_soft_tissue_window_shows_air_dark_and_bone_bright():
    image = np.full((64, 64), -1000.0, np.float32)  # air on the left
    image[:, 32:] = 1000.0                           # bone on the right
    config = MultiCropConfig(**{**PLAIN, "ct_windows": [(40.0, 400.0)], "ct_window_jitter": 0.0})
    (crop,) = MultiCrop(config, seed=0)(image, "hounsfield")
    assert torch.all(crop[0, :, :31] == 0.0)
    assert torch.all(crop[0, :, 33:] == 1.0)


def test_window_level_and_width_are_applied_in_hounsfield_units():
    image = np.full((64, 64), 40.0, np.float32)  # the level of the window: mid grey
    image[:, 32:] = 240.0                         # level + width / 2: white
    config = MultiCropConfig(**{**PLAIN, "ct_windows": [(40.0, 400.0)], "ct_window_jitter": 0.0})
    (crop,) = MultiCrop(config, seed=0)(image, "hounsfield")
    assert torch.allclose(crop[0, :, :31], torch.tensor(0.5), atol=1e-5)
    assert torch.allclose(crop[0, :, 33:], torch.tensor(1.0), atol=1e-5)


def test_zoom_out_fills_outside_with_background_not_zero_hu():
    image = np.full((64, 64), 40.0, np.float32)
    image[0, 0] = -1024.0  # the darkest value: air
    config = MultiCropConfig(**{**PLAIN, "scale_jitter": (2.0, 2.0), "ct_windows": [(40.0, 400.0)],
                                "ct_window_jitter": 0.0})
    (crop,) = MultiCrop(config, seed=0)(image, "hounsfield")
    assert crop[0, 0, 0] == 0.0          # corner: outside the image, filled with air
    assert crop[0, 32, 32] == pytest.approx(0.5, abs=1e-5)  # centre: the 40 HU tissue


def test_same_seed_same_crops_other_seed_other_crops():
    image = ct_slice()
    config = MultiCropConfig.preset("cpu")
    first = MultiCrop(config, seed=7)(image, "hounsfield")
    second = MultiCrop(config, seed=7)(image, "hounsfield")
    other = MultiCrop(config, seed=8)(image, "hounsfield")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_a_generator_given_per_call_decides_the_crops():
    image = ct_slice()
    augment = MultiCrop(MultiCropConfig.preset("cpu"), seed=0)
    first = augment(image, "hounsfield", generator=torch.Generator().manual_seed(42))
    augment(image, "hounsfield")  # the transform's own generator moves on; the given one is separate
    second = augment(image, "hounsfield", generator=torch.Generator().manual_seed(42))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_blur_smooths_and_keeps_the_mean():
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    config = MultiCropConfig(**{**PLAIN, "blur_prob": 1.0, "blur_sigma": (1.5, 1.5)})
    (blurred,) = MultiCrop(config, seed=0)(image, "normalized")
    assert blurred.std() < 0.5 * image.std()
    assert blurred.mean() == pytest.approx(image.mean(), abs=0.01)


def test_shrinking_crops_do_not_alias():
    """A fine stripe pattern shrunk 8x must come out near its mean grey, not as a moire."""
    stripes = np.tile(np.array([0.0, 1.0], np.float32), (512, 256))
    config = MultiCropConfig(**{**PLAIN, "rotation": (10.0, 10.0)})
    (crop,) = MultiCrop(config, seed=0)(stripes, "normalized")
    inner = crop[0, 8:-8, 8:-8]  # away from the rotated borders, which fill with black
    assert inner.mean() == pytest.approx(0.5, abs=0.02)
    assert inner.std() < 0.05


def test_without_a_seed_the_global_torch_generator_decides():
    """DataLoader seeds torch's global generator per worker; an unseeded MultiCrop must follow it."""
    image = ct_slice()
    augment = MultiCrop(MultiCropConfig.preset("cpu"))
    torch.manual_seed(5)
    first = augment(image, "hounsfield")
    torch.manual_seed(5)
    second = augment(image, "hounsfield")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_own_affine_grid_equals_torch_affine_grid():
    from medssl.data.augment import affine_grid

    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [3, 1, 20, 20], align_corners=False)
    assert torch.allclose(affine_grid(theta, 20), expected, atol=1e-6)
