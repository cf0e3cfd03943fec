"""Shard pixel formats: lossless in both, recorded per sample, old PNG shards still read, WebDataset-readable."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import zstandard

from medssl.shard_format import (
    PIXEL_EXTENSIONS,
    Sample,
    decode_pixels,
    encode_pixels,
    read_shard,
    storage_for,
    write_shard,
)


def _values(semantics: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if semantics == "hounsfield":
        return np.rint(rng.uniform(-1024, 3000, (37, 53))).astype(np.float32)  # whole HU
    return (rng.integers(0, 65536, (37, 53)) / 65535).astype(np.float32)


@pytest.mark.parametrize("pixel_format", list(PIXEL_EXTENSIONS))
@pytest.mark.parametrize("semantics", ["hounsfield", "normalized"])
def test_every_format_is_lossless_at_the_stored_resolution(pixel_format, semantics):
    values = _values(semantics)
    store = storage_for(semantics, pixel_format)
    meta = {"key": "k", "size": list(values.shape), "intensity": {"store": store}}
    np.testing.assert_allclose(decode_pixels(encode_pixels(values, store), meta), values, rtol=0, atol=1e-6)


def test_a_shard_may_mix_formats_and_old_png_samples_without_a_format_still_read(tmp_path):
    values = _values("hounsfield")
    samples = []
    for key, pixel_format in (("new", "u16-planes-zstd"), ("png", "png16")):
        store = storage_for("hounsfield", pixel_format)
        samples.append(Sample(key, encode_pixels(values, store),
                              {"key": key, "size": list(values.shape), "intensity": {"store": store}}))
    old_store = {"scale": 1.0, "offset": -1024.0}  # before issue 12: no format in the JSON, PNG bytes
    samples.append(Sample("old", samples[1].pixels, {"key": "old", "size": list(values.shape),
                                                      "intensity": {"store": old_store}}))
    write_shard(tmp_path / "s.tar", samples)
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert tar.getnames() == ["new.u16.zst", "new.json", "png.png", "png.json", "old.png", "old.json"]
    read = list(read_shard(tmp_path / "s.tar"))
    assert [s.key for s in read] == ["new", "png", "old"]
    for s in read:
        np.testing.assert_array_equal(decode_pixels(s.pixels, s.meta), values)


def test_a_plain_reader_decodes_the_zstd_planes_as_documented(tmp_path):
    """What the module docstring tells WebDataset users: zstd, two byte planes, low bytes first."""
    values = _values("hounsfield")
    store = storage_for("hounsfield")
    data = encode_pixels(values, store)
    h, w = values.shape
    planes = np.frombuffer(zstandard.ZstdDecompressor().decompress(data), np.uint8).reshape(2, h, w)
    stored = planes[0] | (planes[1].astype(np.uint16) << 8)
    np.testing.assert_array_equal(stored * store["scale"] + store["offset"], values)


def test_an_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="sample k: unknown pixel format 'jxl'"):
        decode_pixels(b"", {"key": "k", "size": [1, 1], "intensity": {"store": {"scale": 1, "offset": 0,
                                                                                "format": "jxl"}}})
