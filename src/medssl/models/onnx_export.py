"""An encoder as one ONNX file (features out, any batch size), checked with onnxruntime against torch.

torch's default exporter (``torch.export`` based, ``dynamo=True``; it needs ``onnxscript``) is used: the
older TorchScript exporter is deprecated and cannot export a ViT whose position embedding is resampled
to the input size (``dynamic_img_size``, bicubic antialiased). The spatial size is fixed to the card's
input size; the batch axis is dynamic.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "image", "features"
TOLERANCE = 1e-4           # max abs difference between onnxruntime's and torch's features
_PROTOBUF_LIMIT = 2 << 30  # one ONNX file holds at most 2 GiB; larger weights go to a file beside it


def write_onnx(encoder: nn.Module, in_chans: int, input_size: int, path: Path) -> None:
    """Export ``encoder`` (eval mode, CPU) to ``path``."""
    example = torch.zeros(2, in_chans, input_size, input_size)
    weights_bytes = sum(p.numel() * p.element_size() for p in encoder.state_dict().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about its own internals, not about the model
        torch.onnx.export(encoder, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                          external_data=weights_bytes >= _PROTOBUF_LIMIT, verbose=False)


def onnx_max_abs_diff(path: Path, encoder: nn.Module, images: np.ndarray) -> float:
    """Max abs difference between onnxruntime's and torch's features of ``images`` (N, C, S, S) float32,
    run as one batch and again one image at a time (the batch axis must really be free)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = encoder(torch.from_numpy(images)).numpy()
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    single = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + 1]})[0] for i in range(len(images))])
    return float(max(np.abs(batched - expected).max(), np.abs(single - expected).max()))


USAGE = """```python
import numpy as np, onnxruntime

session = onnxruntime.InferenceSession("{file}")
x = np.random.rand(4, 1, {size}, {size}).astype(np.float32)  # one grey channel in [0, 1], see Preprocessing
features = session.run(["{output}"], {{"{input}": x}})[0]  # (4, {dim})
```"""
