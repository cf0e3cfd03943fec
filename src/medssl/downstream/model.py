"""Downstream networks: an encoder (pretrained or random) with a linear head, plus the SSL parts of hybrid.

The encoder comes from a ``medssl pretrain`` run folder (``encoder.safetensors`` + model card), from a
weights file of ``backbone`` the user has (``medssl.models.weights``), or is a fresh timm backbone
(``--init scratch``). For the hybrid regime the whole pretraining network is
rebuilt from the run's ``checkpoint.pt`` (its "model" entry holds backbone, projection head and
prototypes; its "config" the pretraining settings), so the self-supervised loss continues with the
pretrained heads, loss weights and views; from scratch the heads are fresh, shaped by ``scratch_ssl``.
The classifier and the SSL network share one backbone module.

``best.pt`` in a finetune output folder holds the classifier (backbone and head) and what is needed
to rebuild and feed it; ``load_classifier`` rebuilds it in one call (for evaluation and robustness).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from medssl import storage
from medssl.artifacts import BEST, CHECKPOINT
from medssl.config import ConfigError, FinetuneConfig, MultiCropConfig, PretrainConfig
from medssl.downstream.kinds import KINDS
from medssl.models import SSLModel, create_backbone
from medssl.models.export import load_encoder, read_card
from medssl.models.weights import is_weights_file
from medssl.models.weights import load_backbone_weights as load_weights_file
from medssl.ssl import HybridLoss
from medssl.train.checkpoint import load_checkpoint, save_checkpoint
from medssl.train.optim import param_groups


class Classifier(nn.Module):
    """Encoder features -> one logit per task output (a linear head, as in linear probing protocols)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_outputs: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


@dataclass
class Networks:
    classifier: Classifier
    architecture: str
    init: dict[str, Any]                  # where the weights came from, for metrics.json
    ssl: SSLModel | None = None           # hybrid only; ssl.backbone is classifier.backbone
    ssl_loss: HybridLoss | None = None
    ssl_views: MultiCropConfig | None = None

    def to(self, device: torch.device) -> Networks:
        self.classifier.to(device)
        if self.ssl is not None:
            self.ssl.to(device)
            self.ssl_loss.to(device)
        return self


def _ssl_parts(pcfg: PretrainConfig, cfg: FinetuneConfig) -> tuple[SSLModel, HybridLoss, MultiCropConfig]:
    """The pretraining network, objective and views described by ``pcfg``; no feature queue (see README)."""
    views = cfg.ssl_augment.over(pcfg.multicrop().model_dump())
    try:
        loss = HybridLoss.from_config(pcfg, views.n_global)
    except ValueError as e:
        raise ConfigError(f"ssl_augment: {e}") from None
    return SSLModel(pcfg.backbone, pcfg.proj_hidden, pcfg.proj_dim, pcfg.n_prototypes), loss, views


def build_networks(cfg: FinetuneConfig, n_outputs: int) -> Networks:
    """Encoder from ``cfg.init`` (run folder or scratch), a fresh head, and the SSL parts in hybrid mode."""
    if cfg.init == "scratch":
        init = {"init": "scratch", "architecture": cfg.backbone}
        if cfg.mode == "hybrid":
            ssl, loss, views = _ssl_parts(cfg.scratch_pretrain_config(), cfg)
            return Networks(Classifier(ssl.backbone, ssl.feature_dim, n_outputs), cfg.backbone, init, ssl, loss, views)
        backbone, dim = create_backbone(cfg.backbone)
        return Networks(Classifier(backbone, dim, n_outputs), cfg.backbone, init)

    if is_weights_file(cfg.init):  # the user's encoder (e.g. ImageNet weights), with fresh heads as from scratch
        nets = build_networks(cfg.model_copy(update={"init": "scratch"}), n_outputs)
        nets.init = {"init": cfg.init, "architecture": cfg.backbone,
                     **load_weights_file(nets.classifier.backbone, cfg.init)}
        return nets

    run = storage.location(cfg.init)  # a local folder or an s3:// run folder
    try:
        card = read_card(run)
    except FileNotFoundError as e:
        raise ConfigError(f"--init {run}: {e}; or use --init scratch") from None
    init = {"init": str(run), "architecture": card.architecture, "pretrain_steps": card.steps}
    if cfg.mode != "hybrid":
        return Networks(Classifier(load_encoder(run), card.feature_dim, n_outputs), card.architecture, init)

    checkpoint = storage.join(run, CHECKPOINT)
    if not storage.exists(checkpoint):
        raise ConfigError(f"--mode hybrid needs {checkpoint}: the pretrained projection head and prototypes "
                          "are kept only there (encoder.safetensors holds the backbone alone)")
    ckpt = load_checkpoint(checkpoint, keys=("step", "config", "model"))
    if ckpt["step"] != card.steps:
        raise ConfigError(f"{run}: {CHECKPOINT} is at step {ckpt['step']} but the encoder at step {card.steps}; "
                          "finish the pretraining run (rerun its command) before hybrid fine-tuning")
    ssl, loss, views = _ssl_parts(PretrainConfig.model_validate(ckpt["config"]), cfg)
    ssl.load_state_dict(ckpt["model"])
    return Networks(Classifier(ssl.backbone, ssl.feature_dim, n_outputs), card.architecture, init, ssl, loss, views)


def _plain_groups(module: nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """Weight decay on matrices/kernels only, as in pretraining; no LARS trust ratio when fine-tuning."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "base_lr": lr}
              for g in param_groups(module, weight_decay)]
    return [g for g in groups if g["params"]]


def optimizer_groups(nets: Networks, cfg: FinetuneConfig) -> list[dict]:
    """Parameter groups with their ``base_lr``: encoder (``lr``, with layer decay), SSL heads (``lr``), head
    (``head_lr``)."""
    groups = []
    if cfg.mode != "linear":
        backbone = nets.classifier.backbone
        if cfg.layer_decay is not None:
            # timm's BEiT-style grouping: the block nearest the head gets lr * decay, each block below one more factor.
            for g in param_groups_layer_decay(backbone, cfg.weight_decay, layer_decay=cfg.layer_decay):
                groups.append({"params": g["params"], "weight_decay": g["weight_decay"],
                               "base_lr": cfg.lr * g["lr_scale"]})
        else:
            groups += _plain_groups(backbone, cfg.weight_decay, cfg.lr)
        if nets.ssl is not None:
            groups += _plain_groups(nets.ssl.projection, cfg.weight_decay, cfg.lr)
            groups += _plain_groups(nets.ssl.prototypes, cfg.weight_decay, cfg.lr)
    return groups + _plain_groups(nets.classifier.head, cfg.weight_decay, cfg.head_lr)


def build_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU if there is one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, kind: str, batch_size: int, device: torch.device) -> np.ndarray:
    """Probabilities (N, K) of ``model`` (eval mode) over ``inputs`` (images or features), in batches."""
    model.eval()
    out = [KINDS[kind].probabilities(model(inputs[i:i + batch_size].to(device)).float()).cpu()
           for i in range(0, len(inputs), batch_size)]
    return torch.cat(out).numpy()


def save_classifier(path: Path, nets: Networks, record: dict[str, Any]) -> None:
    """Atomic: a crash leaves the previous best checkpoint intact."""
    save_checkpoint(path, {"model": nets.classifier.state_dict(), "architecture": nets.architecture,
                           "feature_dim": nets.classifier.head.in_features, **record})


def load_classifier(out_dir: Path | str) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the best classifier of a finetune output folder: (model in eval mode, its checkpoint record).

    The record holds ``kind``, ``outputs`` (names of the K outputs), ``preprocess`` (input_size, ct_window,
    percentiles, modalities: how images must be prepared) and ``config``. A ``best.pt`` that cannot be
    loaded without unpickling (older medssl, or crafted) raises ``CheckpointError`` and runs nothing.
    """
    path = Path(out_dir) / BEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {out_dir} the output folder of `medssl finetune`?")
    ckpt = load_checkpoint(path, keys=("model", "architecture", "feature_dim", "outputs"))
    backbone, _ = create_backbone(ckpt["architecture"])
    model = Classifier(backbone, ckpt["feature_dim"], len(ckpt["outputs"]))
    model.load_state_dict(ckpt.pop("model"))
    return model.eval(), ckpt
