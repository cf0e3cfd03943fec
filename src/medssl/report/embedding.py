"""A 2D map of a pretrained encoder's features: t-SNE (van der Maaten & Hinton, 2008), PCA for tiny sets.

Features are L2-normalised first: the SSL objectives compare them by cosine similarity, so that is
the geometry the map should keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medssl.downstream.decode import fit_square  # the same input preparation as `medssl finetune`
from medssl.report.samples import ShardImage

MIN_TSNE_POINTS = 20   # below this t-SNE's neighbourhoods are meaningless; PCA shows the spread honestly


def encode(run_dir: Path, samples: list[ShardImage], batch_size: int = 64) -> np.ndarray:
    """Features (N, D) of the samples through the run's encoder, inputs prepared as its card says."""
    from medssl.models.export import load_encoder

    encoder = load_encoder(run_dir)
    size = int(encoder.model_card["input_size"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    features = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = np.stack([fit_square(s.image, size) for s in samples[start:start + batch_size]])
            features.append(encoder(torch.from_numpy(batch).unsqueeze(1).to(device)).float().cpu().numpy())
    return np.concatenate(features)


def project_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates and the method's name."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if float(x.var(axis=0).sum()) < 1e-12:  # a collapsed encoder: no spread to map (PCA would divide by 0)
        return np.zeros((len(x), 2)), "nothing: the encoder gives every image the same features"
    if len(x) < MIN_TSNE_POINTS:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(x) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x), f"t-SNE (perplexity {perplexity:.0f})"
