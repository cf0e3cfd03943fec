"""Precision: what ``auto`` resolves to, and the guard around oneDNN's bf16 strided-convolution fault."""

from __future__ import annotations

import torch
from torch import nn

from medssl.config import PretrainConfig
from medssl.train import precision
from medssl.train.precision import guard_small_strided_convs, use_bf16


def _weight_grad(conv: nn.Conv2d, side: int, junk: float) -> tuple[torch.Tensor, torch.dtype]:
    # Leave freed blocks holding ``junk``: the faulty kernel reads memory it never wrote.
    for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20):
        torch.full((n,), junk).sum()
    conv.zero_grad(set_to_none=True)
    x = torch.randn(8, 64, side, side, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().sum().backward()
    return conv.weight.grad.clone(), y.dtype


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(64, 64, 3, stride=2, padding=1).to(memory_format=torch.channels_last)


def test_a_strided_conv_on_a_smaller_input_gets_the_same_bf16_gradient_whatever_memory_held():
    conv = _conv()
    assert guard_small_strided_convs(conv) == 1
    grads = [_weight_grad(conv, 1, junk)[0] for junk in (0.0, float("nan"), 1e30, -7.0)]
    assert all(torch.isfinite(g).all() for g in grads)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)


def test_the_guard_runs_only_the_faulty_shape_in_fp32():
    conv = _conv()
    guard_small_strided_convs(conv)
    assert _weight_grad(conv, 1, 0.0)[1] == torch.float32
    assert _weight_grad(conv, 4, 0.0)[1] == torch.bfloat16  # larger inputs keep bf16's speed


def test_auto_precision_follows_the_hardware(monkeypatch):
    cfg = PretrainConfig(shards=["x"], out="y")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert use_bf16(cfg, torch.device("cpu"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not use_bf16(cfg, torch.device("cpu"))
    assert use_bf16(cfg.model_copy(update={"precision": "bf16"}), torch.device("cpu"))
    assert not use_bf16(cfg.model_copy(update={"precision": "fp32"}), torch.device("cpu"))
