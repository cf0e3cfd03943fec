"""The pretraining loop: shards -> multi-crop views -> backbone + heads -> hybrid loss -> encoder.

One screen of training loop (``pretrain``), with the set-up and bookkeeping in small helpers around
it. Works the same in one process and under ``torchrun`` (DDP; nccl on GPUs, gloo on CPU).

Resume: rerunning the same command continues from ``checkpoint.pt`` in the run folder. The checkpoint
holds model, optimiser, step, the data position, every rank's random state and loss state (the
feature queue is per rank), so a resumed run takes the same steps an uninterrupted one would
(bit-exact with ``deterministic=True`` on the same machine and process count, in fp32 and in bf16:
see ``medssl.train.precision``). It needs as many
processes as wrote the checkpoint, spread over nodes in any way, and mid-epoch the same data layout
(``_resume_position`` says why and refuses otherwise, before anything is built). What was logged
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medssl import __version__, storage
from medssl.atomic import atomic_write_text
from medssl.config import ConfigError, PretrainConfig, dump_config
from medssl.data.augment import MultiCrop
from medssl.data.device_crops import DeviceMultiCrop
from medssl.data.stream import ShardStream, collate_stored, rank_samples
from medssl.models.export import save_encoder
from medssl.models.ssl_model import SSLModel
from medssl.models.weights import init_backbone
from medssl.ssl import FeatureQueue, HybridLoss
from medssl.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medssl.distributed import DistInfo, all_gather_objects, all_reduce_mean, init_distributed, shutdown_distributed
from medssl.train.optim import build_optimizer
from medssl.train.precision import guard_small_strided_convs, use_bf16
from medssl.train.schedule import warmup_cosine

CHECKPOINT = "checkpoint.pt"
SNAPSHOTS = "snapshots"


class TrainingDiverged(RuntimeError):
    """Training cannot go on: pretraining after ``max_bad_steps`` consecutive non-finite losses, a
    fine-tune when it diverged before any evaluation gave a validation AUC (no result to report)."""


def _data_summary(shards: list[str | Path]) -> dict:
    summary: dict[str, Any] = {"shard_folders": [str(s) for s in shards], "samples": 0, "by_modality": {}}
    for folder in shards:
        summary["samples"] += json.loads(storage.read_text(storage.join(folder, "index.json")))["samples"]
        report = storage.join(folder, "report.json")
        if storage.exists(report):
            for modality, counts in json.loads(storage.read_text(report))["by_modality"].items():
                summary["by_modality"][modality] = summary["by_modality"].get(modality, 0) + counts["samples"]
    return summary


def _queue_per_rank(cfg: PretrainConfig, world_size: int) -> int:
    """Each process keeps its own queue of queue_length / world_size features; the config cannot check
    this relation, as the number of processes is known only once training starts."""
    if cfg.queue_length % world_size:
        raise ConfigError(f"queue_length {cfg.queue_length} is not a multiple of the {world_size} processes: each "
                          f"keeps queue_length / {world_size} features; use a multiple of {world_size}")
    return cfg.queue_length // world_size


# What a user calls each part of the stream's data layout (``ShardStream.state_dict``), in messages.
_LAYOUT_NAMES = {"world_size": "processes", "num_workers": "workers", "samples": "samples in the shard folders"}


def _resume_position(ckpt: dict, stream: ShardStream, path: str | Path) -> dict:
    """The stream state to resume from; a ConfigError (exit 2) where the run cannot go on as the
    checkpointed one would have.

    The number of processes is part of the recipe, not of the machine: the global batch is batch_size x
    processes and the learning rate is scaled from it, InfoNCE gathers its negatives over the processes,
    and the feature queue and the random states are kept per process. So a run resumes only with as many
    processes as wrote the checkpoint (how they are spread over nodes does not matter). The rest of the
    data layout (DataLoader workers, batch size, seed, shards) decides which samples the rest of an epoch
    holds, so it may change only at an epoch boundary (a checkpoint before an epoch's first batch or after
    its last), from where the stream deals the next epoch out afresh.
    """
    saved, now = ckpt["data"], stream.state_dict()
    changed = [k for k in now if k not in ("epoch", "consumed") and saved.get(k) != now[k]]
    if not changed:
        return saved
    epoch_done = saved["consumed"] == rank_samples(saved["samples"], saved["world_size"], saved["batch_size"])
    if "world_size" not in changed and (saved["consumed"] == 0 or epoch_done):
        return {**now, "epoch": saved["epoch"] + 1 if epoch_done else saved["epoch"], "consumed": 0}
    diffs = ", ".join(f"{_LAYOUT_NAMES.get(k, k)} {saved.get(k)} -> {now[k]}" for k in changed)
    written = f"step {ckpt['step']}, epoch {saved['epoch']}, {saved['consumed']} samples per process into it"
    if "world_size" in changed:
        n = saved["world_size"]
        todo = (f"the global batch (batch_size x processes), the learning rate scaled from it, the feature queue and "
                f"the random states depend on the process count: relaunch with {n} process{'es' if n > 1 else ''} "
                "in all (nodes x processes per node, any split), or pretrain into a new --out")
    else:
        todo = ("the rest of this epoch is dealt out to processes and workers by the old values: resume with "
                "them (they may change once an epoch is complete), or pretrain into a new --out")
    raise ConfigError(f"cannot resume {path} ({written}) with {diffs}: {todo}")


class _Log:
    """metrics.jsonl and TensorBoard events, written by rank 0 only.

    ``rows``: how many rows of an existing metrics.jsonl to keep (those written up to the checkpoint the
    run resumes from; 0 for a fresh start); the rest is dropped. TensorBoard drops the scalars of steps
    from ``purge_step`` on. ``rows`` counts the rows written so far, for the next checkpoint.
    In a local folder every row is on disk when written; on object storage (no appending) the rows are
    held here and uploaded by ``save`` (before each checkpoint), with no TensorBoard events.
    """

    def __init__(self, out: str | Path, enabled: bool, rows: int, purge_step: int):
        self.enabled, self.rows = enabled, rows
        self.held: list[str] | None = None  # the rows, on object storage
        self.jsonl = self.tb = None
        if not enabled:
            return
        self.path = storage.join(out, "metrics.jsonl")
        found = storage.exists(self.path)
        kept = storage.read_text(self.path).splitlines(keepends=True)[:rows] if found else []
        if storage.is_url(out):
            self.held = kept
        else:
            from torch.utils.tensorboard import SummaryWriter

            if found:
                atomic_write_text(self.path, "".join(kept))
            self.jsonl = open(self.path, "a", buffering=1)
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self.rows += 1
        if self.held is not None:
            self.held.append(line)
            return
        self.jsonl.write(line)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"pretrain/{k}", v, record["step"])
        self.tb.flush()  # like the line-buffered jsonl: a killed run keeps every step it logged

    def save(self) -> None:
        """Upload the held rows (object storage). Before a checkpoint, so the stored file always has at
        least the rows that checkpoint counts."""
        if self.held is not None:
            atomic_write_text(self.path, "".join(self.held))

    def close(self) -> None:
        self.save()
        if self.jsonl is not None:
            self.jsonl.close()
            self.tb.close()


def pretrain(cfg: PretrainConfig, show_progress: bool = True) -> str | Path:
    """Train; returns the run folder (a Path, or a URL) holding ``encoder.safetensors`` and ``model_card.json``."""
    info = init_distributed(cfg.device)
    try:
        return _pretrain(cfg, info, show_progress)
    finally:
        shutdown_distributed()


def _pretrain(cfg: PretrainConfig, info: DistInfo, show_progress: bool) -> str | Path:
    queue_length = _queue_per_rank(cfg, info.world_size)
    out = cfg.out
    storage.makedirs(out)
    torch.manual_seed(cfg.seed + info.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    crops = cfg.multicrop()
    # crops_on=device: the workers only decode; the same views are made per batch on the device (same seeds).
    on_device = DeviceMultiCrop(crops) if cfg.crops_on == "device" else None
    stream = ShardStream(cfg.shards, batch_size=cfg.batch_size, num_workers=cfg.workers, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, transform=None if on_device else MultiCrop(crops),
                         pixels="stored" if on_device else "values", rank=info.rank, world_size=info.world_size)
    loader = stream.loader(pin_memory=info.device.type == "cuda", **({"collate_fn": collate_stored} if on_device else {}))
    ckpt, checkpoint_file = None, storage.join(out, CHECKPOINT)
    if storage.exists(checkpoint_file):
        ckpt = load_checkpoint(checkpoint_file, keys=("model", "optimizer", "loss", "data", "rng", "step", "log_rows"))
        position = _resume_position(ckpt, stream, checkpoint_file)
    total_steps = min(cfg.epochs * stream.steps_per_epoch, cfg.max_steps or math.inf)

    model = SSLModel(cfg.backbone, cfg.proj_hidden, cfg.proj_dim, cfg.n_prototypes,
                     channels_last=cfg.channels_last).to(info.device)
    bf16 = use_bf16(cfg, info.device)
    if bf16 and info.device.type == "cpu":
        guard_small_strided_convs(model)
    # Without the SwAV term the prototypes get no gradient, which DDP must be told about.
    ddp = DistributedDataParallel(model, find_unused_parameters=cfg.w_cluster == 0) if info.world_size > 1 else model
    queue = FeatureQueue(crops.n_global, queue_length, cfg.proj_dim) if queue_length else None
    loss_fn = HybridLoss(cfg.w_cluster, cfg.w_contrast, crops.n_global, cfg.temperature, cfg.nce_temperature,
                         cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations, queue).to(info.device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, cfg.momentum)
    lr_scale = cfg.batch_size * info.world_size / 256  # linear scaling rule (Goyal et al. 2017)

    step, log_rows = 0, 0
    if ckpt is None and cfg.init is not None:  # continued pretraining (the card's config names the source)
        init_backbone(model.backbone, cfg.backbone, storage.location(cfg.init))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loss_fn.load_state_dict(ckpt["loss"][info.rank])
        stream.load_state_dict(position)
        set_rng_state(ckpt["rng"][info.rank])
        step, log_rows = ckpt["step"], ckpt["log_rows"]
    # TensorBoard can only drop whole steps: a skip event logged after the checkpoint has the checkpoint's
    # step, so it may show twice there (metrics.jsonl is cut by rows and stays exact).
    log = _Log(out, info.is_main, log_rows, purge_step=step + 1)

    def checkpoint() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "data": stream.state_dict(), "rng": all_gather_objects(rng_state()), "log_rows": log.rows,
                 # The queue's state holds a tensor and its fill level (a dict of Python ints).
                 "loss": all_gather_objects({k: v.cpu() if isinstance(v, torch.Tensor) else v
                                             for k, v in loss_fn.state_dict().items()}),
                 "config": dump_config(cfg)}
        if info.is_main:
            log.save()
            save_checkpoint(checkpoint_file, state)

    def save_run_encoder(folder: str | Path) -> None:
        save_encoder(folder, model.backbone, {
            "architecture": cfg.backbone, "in_chans": 1, "feature_dim": model.feature_dim,
            "input_size": crops.global_size, "steps": step, "medssl_version": __version__,
            "config": dump_config(cfg), "data": _data_summary(cfg.shards),
        })

    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", disable=not (show_progress and info.is_main))
    bad_steps, seen, t_log = 0, 0, time.perf_counter()
    while step < total_steps:
        for batch in loader:  # goes on from the stream's position, into the next epoch when one is used up
            views = (on_device.views(batch, info.device) if on_device else
                     [v.to(info.device, non_blocking=True) for v in batch["values"]])
            lr = warmup_cosine(step, total_steps, cfg.lr * lr_scale, cfg.final_lr * lr_scale, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.normalize_prototypes()
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
                embeddings, scores = ddp(views)
            loss, parts = loss_fn(embeddings, scores, model.prototypes)

            # Every rank must agree to skip, or DDP's gradient all-reduce would wait forever.
            bad = torch.tensor(float(not torch.isfinite(loss)), device=info.device)
            if info.world_size > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            optimizer.zero_grad(set_to_none=True)
            if bad.item():
                bad_steps += 1
                log.write({"step": step, "event": "non-finite loss, step skipped", "consecutive": bad_steps})
                if bad_steps >= cfg.max_bad_steps:
                    checkpoint()
                    raise TrainingDiverged(f"{bad_steps} consecutive non-finite losses at step {step}; "
                                           "lower lr, raise warmup_steps or check the data")
                continue
            bad_steps = 0
            loss_fn.enqueue(embeddings)  # only now that the step is known finite: NaN features would poison the queue
            loss.backward()
            if step < cfg.freeze_prototypes_steps:  # SwAV: fixed prototypes while features are still random
                model.prototypes.weight.grad = None
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            seen += len(batch["key"]) * info.world_size
            bar.update(1)

            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_log
                record = {"step": step, "epoch": stream.epoch, "lr": lr,
                          "loss": all_reduce_mean(loss.detach()).item(),
                          **{k: all_reduce_mean(v).item() for k, v in parts.items()},
                          "images_per_s": seen / elapsed if elapsed > 0 else 0.0}
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                seen, t_log = 0, time.perf_counter()
            if cfg.snapshot_every and step % cfg.snapshot_every == 0 and info.is_main:
                # Before the checkpoint: a resume from it never skips a snapshot of its step.
                save_run_encoder(storage.join(out, SNAPSHOTS, f"step-{step:06d}"))
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                checkpoint()
            if step >= total_steps:
                break
    bar.close()
    log.close()
    if info.is_main:
        save_run_encoder(out)
    return out
