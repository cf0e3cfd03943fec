"""The pretraining loop: shards -> multi-crop views -> backbone + heads -> hybrid loss -> encoder.

Three parts, as in DINO's ``train_one_epoch``: ``build`` makes everything a run needs (stream, model, loss,
optimiser; state from the checkpoint when resuming) into one ``Pretraining``; ``train_step`` is one
optimisation step on one batch (``forward_loss``, ``backward``, ``optimizer_step``); ``pretrain`` is the loop around
them: logging, snapshots, checkpoints. Works the same in one process and under ``torchrun`` (DDP; nccl on GPUs,
gloo on CPU).

Resume: rerunning the same command continues from ``checkpoint.pt`` in the run folder. The checkpoint
holds model, optimiser, step, the data position, every rank's random state and loss state (the
feature queue is per rank), so a resumed run takes the same steps an uninterrupted one would
(bit-exact with ``deterministic=True`` on the same machine and process count, in fp32 and in bf16:
see ``medssl.train.precision``). It needs as many processes as wrote the checkpoint, spread over nodes
in any way, and mid-epoch the same data layout
(``train/resume.py`` says why and refuses otherwise, before anything is built). What was logged
after the checkpoint is dropped (metrics.jsonl is cut back to the rows it had then, TensorBoard purges
later steps), so a resumed run logs every step once.

Object storage: ``shards`` and ``out`` may be URLs (``s3://bucket/prefix``, see ``medssl.storage``). Shards
are streamed; checkpoints, the encoder and its card are uploaded whole, each atomically. An object cannot
be appended to, so there metrics.jsonl is uploaded whole before each checkpoint and at the end (a killed
run loses only rows a resume would drop anyway), and no TensorBoard events are written.

Non-finite losses: the step is skipped (no update, nothing enters the feature queue) and its batch counts
as consumed; after ``max_bad_steps`` in a row the run stops. The data position (epoch, samples consumed)
is the stream's own count of batches drawn, never derived from the step count, which skipped batches
leave behind: a skip neither replays an epoch nor loses the position on resume.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medssl import __version__, storage
from medssl.artifacts import CHECKPOINT, SNAPSHOTS, TrainingDiverged, read_index
from medssl.config import MultiCropConfig, PretrainConfig, dump_config
from medssl.data.augment import MultiCrop
from medssl.data.device_crops import DeviceMultiCrop
from medssl.data.stream import ShardStream, collate_stored
from medssl.distributed import DistInfo, all_gather_objects, all_reduce_mean, init_distributed, shutdown_distributed
from medssl.models.export import save_encoder
from medssl.models.locations import shard_location
from medssl.models.ssl_model import SSLModel
from medssl.models.weights import init_backbone
from medssl.ssl import FeatureQueue, HybridLoss
from medssl.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medssl.train.metrics_log import MetricsLog
from medssl.train.optim import build_optimizer
from medssl.train.precision import guard_small_strided_convs, use_bf16
from medssl.train.resume import queue_per_rank, resume_position
from medssl.train.schedule import warmup_cosine


@dataclass
class Pretraining:
    """Everything one process of a run trains with, made by ``build``."""

    cfg: PretrainConfig
    info: DistInfo
    crops: MultiCropConfig
    stream: ShardStream
    loader: Any  # the stream's DataLoader
    on_device: DeviceMultiCrop | None  # crops_on=device: the views are made here from decoded batches
    model: SSLModel
    ddp: nn.Module  # the model, wrapped in DDP when there are several processes
    loss_fn: HybridLoss
    optimizer: torch.optim.Optimizer
    bf16: bool
    total_steps: int
    step: int = 0  # optimiser steps taken (the checkpoint's when resuming)
    log_rows: int = 0  # rows of metrics.jsonl the checkpoint counted
    bad_steps: int = 0  # consecutive non-finite losses

    def lr(self) -> float:
        """This step's learning rate: warm-up then cosine, scaled linearly with the global batch (Goyal et al. 2017)."""
        scale = self.cfg.batch_size * self.info.world_size / 256
        return warmup_cosine(self.step, self.total_steps, self.cfg.lr * scale, self.cfg.final_lr * scale,
                             self.cfg.warmup_steps)


def build(cfg: PretrainConfig, info: DistInfo) -> Pretraining:
    """Stream, model, loss and optimiser of a run; resumed from ``checkpoint.pt`` in ``cfg.out`` if there is one."""
    queue_length = queue_per_rank(cfg, info.world_size)
    storage.makedirs(cfg.out)
    torch.manual_seed(cfg.seed + info.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    crops = cfg.multicrop()
    # crops_on=device: the workers only decode; the same views are made per batch on the device (same seeds).
    on_device = DeviceMultiCrop(crops) if cfg.crops_on == "device" else None
    stream = ShardStream(cfg.shards, batch_size=cfg.batch_size, num_workers=cfg.workers, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, transform=None if on_device else MultiCrop(crops),
                         pixels="stored" if on_device else "values", rank=info.rank, world_size=info.world_size)
    loader = stream.loader(pin_memory=info.device.type == "cuda",
                           **({"collate_fn": collate_stored} if on_device else {}))
    ckpt, checkpoint_file = None, storage.join(cfg.out, CHECKPOINT)
    if storage.exists(checkpoint_file):
        ckpt = load_checkpoint(checkpoint_file, keys=("model", "optimizer", "loss", "data", "rng", "step", "log_rows"))
        position = resume_position(ckpt, stream, checkpoint_file)  # refuses a changed layout before building more

    model = SSLModel(cfg.backbone, cfg.proj_hidden, cfg.proj_dim, cfg.n_prototypes,
                     channels_last=cfg.channels_last).to(info.device)
    bf16 = use_bf16(cfg, info.device)
    if bf16 and info.device.type == "cpu":
        guard_small_strided_convs(model)
    # Without the SwAV term the prototypes get no gradient, which DDP must be told about.
    ddp = DistributedDataParallel(model, find_unused_parameters=cfg.w_cluster == 0) if info.world_size > 1 else model
    queue = FeatureQueue(crops.n_global, queue_length, cfg.proj_dim) if queue_length else None
    loss_fn = HybridLoss.from_config(cfg, crops.n_global, queue).to(info.device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, cfg.momentum)
    run = Pretraining(cfg, info, crops, stream, loader, on_device, model, ddp, loss_fn, optimizer, bf16,
                      total_steps=min(cfg.epochs * stream.steps_per_epoch, cfg.max_steps or math.inf))

    if ckpt is None and cfg.init is not None:  # continued pretraining (the card's config names the source)
        init_backbone(model.backbone, cfg.backbone, storage.location(cfg.init))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loss_fn.load_state_dict(ckpt["loss"][info.rank])
        stream.load_state_dict(position)
        set_rng_state(ckpt["rng"][info.rank])
        run.step, run.log_rows = ckpt["step"], ckpt["log_rows"]
    return run


def forward_loss(run: Pretraining, batch: dict) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
    """The views of ``batch`` through the model (bf16 autocast where enabled) and the hybrid loss:
    (loss, its parts, the global views' embeddings)."""
    views = (run.on_device.views(batch, run.info.device) if run.on_device else
             [v.to(run.info.device, non_blocking=True) for v in batch["values"]])
    run.model.normalize_prototypes()
    with torch.autocast(run.info.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        embeddings, scores = run.ddp(views)
    loss, parts = run.loss_fn(embeddings, scores, run.model.prototypes)
    return loss, parts, embeddings


def backward(run: Pretraining, loss: Tensor) -> None:
    """Gradients of ``loss`` (zeroed before by ``train_step``)."""
    loss.backward()
    if run.step < run.cfg.freeze_prototypes_steps:  # SwAV: fixed prototypes while features are still random
        run.model.prototypes.weight.grad = None


def optimizer_step(run: Pretraining) -> None:
    """Clip the gradients and update the weights: the step is taken."""
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.step += 1


def train_step(run: Pretraining, batch: dict) -> tuple[Tensor, dict[str, Tensor]] | None:
    """One optimisation step on ``batch``: (loss, parts), or None when the loss was not finite on some
    process, in which case nothing is updated and nothing enters the feature queue."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr()
    loss, parts, embeddings = forward_loss(run, batch)
    # Every rank must agree to skip, or DDP's gradient all-reduce would wait forever.
    bad = torch.tensor(float(not torch.isfinite(loss)), device=run.info.device)
    if run.info.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    run.optimizer.zero_grad(set_to_none=True)
    if bad.item():
        return None
    run.loss_fn.enqueue(embeddings)  # only now that the step is known finite: NaN features would poison the queue
    backward(run, loss)
    optimizer_step(run)
    return loss, parts


def checkpoint(run: Pretraining, log: MetricsLog) -> None:
    """Everything a resume needs, gathered from every process, written by rank 0 (after the log rows it counts)."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
             "data": run.stream.state_dict(), "rng": all_gather_objects(rng_state()), "log_rows": log.rows,
             # The queue's state holds a tensor and its fill level (a dict of Python ints).
             "loss": all_gather_objects({k: v.cpu() if isinstance(v, torch.Tensor) else v
                                         for k, v in run.loss_fn.state_dict().items()}),
             "config": dump_config(run.cfg)}
    if run.info.is_main:
        log.save()
        save_checkpoint(storage.join(run.cfg.out, CHECKPOINT), state)


def save_run_encoder(run: Pretraining, folder: str | Path) -> None:
    cfg = run.cfg
    save_encoder(folder, run.model.backbone, {
        "architecture": cfg.backbone, "in_chans": 1, "feature_dim": run.model.feature_dim,
        "input_size": run.crops.global_size, "steps": run.step, "medssl_version": __version__,
        "config": dump_config(cfg), "data": _data_summary(cfg.shards, folder),
    })


def _data_summary(shards: list[str | Path], run_folder: str | Path) -> dict:
    """What the run read: counts, and where its shard folders are (``models.lineage.locate_shards``)."""
    summary: dict[str, Any] = {"shard_folders": [str(s) for s in shards], "samples": 0, "by_modality": {},
                               "shard_locations": [shard_location(s, run_folder) for s in shards]}
    for folder in shards:
        summary["samples"] += read_index(folder).samples
        report = storage.join(folder, "report.json")
        if storage.exists(report):
            for modality, counts in json.loads(storage.read_text(report))["by_modality"].items():
                summary["by_modality"][modality] = summary["by_modality"].get(modality, 0) + counts["samples"]
    return summary


def pretrain(cfg: PretrainConfig, show_progress: bool = True) -> str | Path:
    """Train; returns the run folder (a Path, or a URL) holding ``encoder.safetensors`` and ``model_card.json``."""
    info = init_distributed(cfg.device)
    try:
        return _loop(build(cfg, info), show_progress)
    finally:
        shutdown_distributed()


def _loop(run: Pretraining, show_progress: bool) -> str | Path:
    cfg, info = run.cfg, run.info
    # TensorBoard can only drop whole steps: a skip event logged after the checkpoint has the checkpoint's
    # step, so it may show twice there (metrics.jsonl is cut by rows and stays exact).
    log = MetricsLog(cfg.out, info.is_main, run.log_rows, purge_step=run.step + 1)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="pretrain", unit="step",
               disable=not (show_progress and info.is_main))
    seen, t_log = 0, time.perf_counter()
    while run.step < run.total_steps:
        for batch in run.loader:  # goes on from the stream's position, into the next epoch when one is used up
            result = train_step(run, batch)
            if result is None:
                run.bad_steps += 1
                log.write({"step": run.step, "event": "non-finite loss, step skipped", "consecutive": run.bad_steps})
                if run.bad_steps >= cfg.max_bad_steps:
                    checkpoint(run, log)
                    raise TrainingDiverged(f"{run.bad_steps} consecutive non-finite losses at step {run.step}; "
                                           "lower lr, raise warmup_steps or check the data")
                continue
            run.bad_steps = 0
            loss, parts = result
            seen += len(batch["key"]) * info.world_size
            bar.update(1)

            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                elapsed = time.perf_counter() - t_log
                record = {"step": run.step, "epoch": run.stream.epoch, "lr": run.optimizer.param_groups[0]["lr"],
                          "loss": all_reduce_mean(loss.detach()).item(),
                          **{k: all_reduce_mean(v).item() for k, v in parts.items()},
                          "images_per_s": seen / elapsed if elapsed > 0 else 0.0}
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                seen, t_log = 0, time.perf_counter()
            if cfg.snapshot_every and run.step % cfg.snapshot_every == 0 and info.is_main:
                # Before the checkpoint: a resume from it never skips a snapshot of its step.
                save_run_encoder(run, storage.join(cfg.out, SNAPSHOTS, f"step-{run.step:06d}"))
            if run.step % cfg.checkpoint_every == 0 or run.step == run.total_steps:
                checkpoint(run, log)
            if run.step >= run.total_steps:
                break
    bar.close()
    log.close()
    if info.is_main:
        save_run_encoder(run, cfg.out)
    return cfg.out
