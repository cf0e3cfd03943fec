"""Which precision pretraining runs in, and a guard around a oneDNN bf16 fault on CPU.

``precision=auto`` means bf16 autocast wherever the hardware computes in bf16: GPUs that support it, and
CPUs with native bf16 instructions (AVX512-BF16 or AMX). On a CPU without them bf16 is emulated and
slower than fp32, so auto stays fp32 there.

The fault: on CPU, oneDNN's bf16 convolution computes a wrong weight gradient when the convolution's
stride is larger than its input (e.g. a 3x3 stride-2 convolution on a 1x1 feature map, as in ResNet's
last stage for crops of 16-31 px). The kernel then reads memory it never wrote, so the gradient depends
on what that memory held before: identical inputs give different gradients from run to run, and NaN
when the memory held a NaN. Found by bisecting a bf16 run that was not reproducible (the notes in
BENCHMARKS.md, "Pretrain"); fp32 and all other shapes tested are exact. ``guard_small_strided_convs``
runs exactly those calls in fp32, so the rest of the network keeps bf16's speed and runs stay
bit-reproducible (and resumable bit-exactly).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from medssl.config import PretrainConfig


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX tiles (the probes are private torch API, so absent = False)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def use_bf16(cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast (see the module docstring for ``auto``)."""
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def _guarded_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    if torch.is_autocast_enabled("cpu") and (x.shape[-2] < self.stride[0] or x.shape[-1] < self.stride[1]):
        with torch.autocast("cpu", enabled=False):
            return type(self).forward(self, x.float())
    return type(self).forward(self, x)


def guard_small_strided_convs(model: nn.Module) -> int:
    """Make every strided 2-D convolution of ``model`` run in fp32 when its input is smaller than its
    stride under CPU autocast (the oneDNN fault above); returns how many convolutions were guarded."""
    guarded = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            module.forward = types.MethodType(_guarded_forward, module)
            guarded += 1
    return guarded
