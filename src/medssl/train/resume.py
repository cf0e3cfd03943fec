"""What a pretraining run may resume with: the process count and data layout of its checkpoint.

See ``resume_position`` for why the process count is part of the recipe, and docs/ARCHITECTURE.md
("A resume keeps the process count").
"""

from __future__ import annotations

from pathlib import Path

from medssl.config import ConfigError, PretrainConfig
from medssl.data.stream import ShardStream, rank_samples


def queue_per_rank(cfg: PretrainConfig, world_size: int) -> int:
    """Each process keeps its own queue of queue_length / world_size features; the config cannot check
    this relation, as the number of processes is known only once training starts."""
    if cfg.queue_length % world_size:
        raise ConfigError(f"queue_length {cfg.queue_length} is not a multiple of the {world_size} processes: each "
                          f"keeps queue_length / {world_size} features; use a multiple of {world_size}")
    return cfg.queue_length // world_size


# What a user calls each part of the stream's data layout (``ShardStream.state_dict``), in messages.
_LAYOUT_NAMES = {"world_size": "processes", "num_workers": "workers", "samples": "samples in the shard folders"}


def resume_position(ckpt: dict, stream: ShardStream, path: str | Path) -> dict:
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
