#!/usr/bin/env python
"""Pretraining throughput: medssl against lightly's SwAV pipeline, on the same shards, in one run.

Both pipelines get the same shard samples, crops (the ``cpu`` preset: 2x96 + 4x48, with the same box
areas), backbone (timm resnet18), head sizes, batch size and number of DataLoader workers.

1. Augmentation only, images/s in one process with one torch thread (a DataLoader worker's setting):
   medssl ``MultiCrop`` on decoded shard samples (float32 in the sample's intensity convention)
   against lightly's ``SwaVTransform`` on the same images as 8-bit RGB PIL images (the conversion is
   not timed, in lightly's favour), and against ``SwaVTransform`` with a +-15 degree rotation (ours
   always rotates).
2. Data loading alone: images/s out of each DataLoader (decode + augmentation in the workers), no model.
3. End to end, steady-state training images/s including data loading; the first ``--warmup-steps``
   steps (worker start-up, first kernels) are left out.
   - medssl: ``medssl.train.pretrain.pretrain`` itself, unchanged: ShardStream + MultiCrop in the
     workers, SSLModel (resnet18, 1 input channel, crops of one size batched through the backbone),
     HybridLoss (SwAV + InfoNCE), LARS, gradient clipping, channels_last (the config default). Once
     with ``precision=fp32``, once with ``precision=bf16`` (bf16 autocast); the default (``auto``) is bf16 on
     CPUs with native bf16 and fp32 elsewhere, and the end-to-end target is checked for it. The time
     of every step comes from its metrics.jsonl (``log_every=1``).
   - lightly: the shape of lightly's SwAV example (examples/pytorch/swav.py): a map-style Dataset
     reading the same shard samples (PNG -> ``decode_pixels`` -> 8-bit PIL RGB) with SwaVTransform, in
     a DataLoader (shuffle, drop_last) with the same workers; the same timm resnet18 built with
     in_chans=3 (SwaVTransform makes RGB crops), SwaVProjectionHead and SwaVPrototypes of our sizes,
     one forward per crop as in the example, SwaVLoss, lightly's LARS; fp32 (``--peer-bf16`` adds a
     run with bf16 autocast + channels_last, for reference).
   Each step is timed from the end of the previous one, so waiting for data counts.

Rounds alternate between the pipelines so that load from other processes hits all of them alike,
and each figure is the median round. An end-to-end run's rate is that of its median step (batch size /
median step time), so that a burst of outside load that hits a few steps drops out. Because the
machine may be shared, every end-to-end run also records how many cores other processes kept busy
meanwhile (/proc/stat less our own CPU time). Such load comes in bursts, so each run first waits (up
to ``--max-wait`` s) for a quiet second; the table uses the quiet rounds (``--quiet``) when there are
any, and up to ``--extra-rounds`` rounds are added while fewer than ``--rounds`` were quiet.

If an end-to-end target is missed (or with ``--profile``), a phase profile follows: the same
components stepped by hand, with the time spent waiting for data, in forward + loss, backward and the
optimiser, the CPU time of the main process and of the DataLoader workers, and the top torch operators
of one step.

Run from the repository root:  .venv/bin/python benchmarks/pretrain.py [--shards DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shlex
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medssl.config import IngestConfig, MultiCropConfig, PretrainConfig
from medssl.data.augment import MultiCrop
from medssl.data.stream import ShardStream, list_shards
from medssl.distributed import init_distributed
from medssl.machine import machine_facts
from medssl.models.backbone import create_backbone
from medssl.shard_format import decode_pixels, read_shard
from medssl.train.precision import use_bf16
from medssl.train.pretrain import backward, build, forward_loss, optimizer_step, pretrain

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
DEFAULT_SHARDS = Path(tempfile.gettempdir()) / "medssl-bench" / "pretrain-shards"
TARGETS = {"augment": 3.0, "end to end": 1.5}  # ours / lightly, from issue 3
SOFT_TISSUE = (40.0, 400.0)  # (level, width) in HU: how a CT sample is shown to lightly
OURS_FP32, OURS_BF16, PEER, PEER_BF16 = "medssl fp32", "medssl bf16", "lightly fp32", "lightly bf16"


# ------------------------------------------------------------------------------------------ machine


# ------------------------------------------------------------------------------------------- shards


def pydicom_data_dir() -> Path | None:
    try:
        import data_store
    except ImportError:
        return None
    return Path(os.path.dirname(data_store.__file__)) / "data"


def ensure_shards(shards: Path, source: Path | None) -> Path:
    """``shards`` if it holds a finished ingest; otherwise ingest ``source`` (or the fallback) into it."""
    if (shards / "index.json").is_file():
        return shards
    if source is not None and not Path(source).exists():
        sys.exit(f"no shards at {shards}, and --source {source} does not exist")
    if source is None:
        source = DEFAULT_SOURCE if DEFAULT_SOURCE.is_dir() else pydicom_data_dir()
    if source is None:
        sys.exit(f"no shards at {shards} and nothing to make them from: {DEFAULT_SOURCE} is missing and "
                 "pydicom-data is not installed; pass --shards DIR (a `medssl ingest` output) or --source DIR")
    from medssl.ingest import ingest

    print(f"making shards: medssl ingest {source} --out {shards}", flush=True)
    start = time.perf_counter()
    ingest(IngestConfig(inputs=[Path(source)], out=shards, workers=2), show_progress=False)
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return shards


def to_pil(values: np.ndarray, semantics: str) -> Image.Image:
    """What a lightly user feeds SwaVTransform: an 8-bit RGB display image (CT in a soft-tissue window)."""
    if semantics == "hounsfield":
        level, width = SOFT_TISSUE
        values = (values - (level - width / 2)) / width
    grey = (np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


class ShardSamples(Dataset):
    """lightly's side of the data: the shard samples as a map-style Dataset of transformed PIL images.

    The tar members' offsets are indexed once (as LightlyDataset lists its folder once); an item is
    read with one seek, its metadata parsed, its pixels decoded with the same ``decode_pixels`` as ours.
    """

    def __init__(self, root: Path, transform):
        self.transform = transform
        self.items: list[tuple[str, int, int, int, int]] = []  # shard, png offset/size, json offset/size
        for shard in list_shards([root]):
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard.path) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = m
            for parts in members.values():
                # The pixel member, whatever its format (decode_pixels reads the format from the JSON).
                png = next(m for ext, m in parts.items() if ext != "json")
                meta = parts["json"]
                self.items.append((str(shard.path), png.offset_data, png.size, meta.offset_data, meta.size))
        self._files: dict[str, io.BufferedReader] = {}  # per process (opened after the workers fork)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, path: str, offset: int, size: int) -> bytes:
        f = self._files.get(path) or self._files.setdefault(path, open(path, "rb"))
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, i: int):
        path, png_at, png_size, meta_at, meta_size = self.items[i]
        meta = json.loads(self._read(path, meta_at, meta_size))
        values = decode_pixels(self._read(path, png_at, png_size), meta)
        return self.transform(to_pil(values, meta["intensity"]["semantics"]))


def load_samples(root: Path, n: int) -> list[tuple[np.ndarray, str]]:
    """The first ``n`` samples of the shards, decoded: (values, semantics)."""
    out = []
    for shard in list_shards([root]):
        for s in read_shard(shard.path):
            out.append((decode_pixels(s.pixels, s.meta), s.meta["intensity"]["semantics"]))
            if len(out) == n:
                return out
    return out


# ----------------------------------------------------------------------------------------- pipelines


def swav_transform(crops: MultiCropConfig, rotation: bool = False):
    from lightly.transforms.swav_transform import SwaVTransform

    extra = dict(rr_prob=1.0, rr_degrees=max(abs(d) for d in crops.rotation)) if rotation else {}
    return SwaVTransform(crop_sizes=(crops.global_size, crops.local_size), crop_counts=(crops.n_global, crops.n_local),
                         crop_min_scales=(crops.global_scale[0], crops.local_scale[0]),
                         crop_max_scales=(crops.global_scale[1], crops.local_scale[1]), **extra)


class LightlySwaV(nn.Module):
    """lightly's SwAV example model, with our backbone and head sizes."""

    def __init__(self, cfg: PretrainConfig, in_chans: int = 3, channels_last: bool = False):
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        self.backbone, dim = create_backbone(cfg.backbone, in_chans)
        self.projection_head = SwaVProjectionHead(dim, cfg.proj_hidden, cfg.proj_dim)
        self.prototypes = SwaVPrototypes(cfg.proj_dim, n_prototypes=cfg.n_prototypes)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.backbone(x).flatten(start_dim=1)
        x = nn.functional.normalize(self.projection_head(x), dim=1, p=2)
        return self.prototypes(x)


class PeerRun:
    """lightly's SwAV training pipeline; ``steps`` yields the phase times of each step (seconds)."""

    def __init__(self, shards: Path, cfg: PretrainConfig, bf16: bool):
        from lightly.loss import SwaVLoss
        from lightly.utils.lars import LARS

        self.cfg, self.bf16 = cfg, bf16
        self.dataset = ShardSamples(shards, swav_transform(cfg.multicrop()))
        self.model = LightlySwaV(cfg, channels_last=bf16)
        self.criterion = SwaVLoss(temperature=cfg.temperature, sinkhorn_iterations=cfg.sinkhorn_iterations,
                                  sinkhorn_epsilon=cfg.sinkhorn_epsilon)
        self.optimizer = LARS(self.model.parameters(), lr=cfg.lr * cfg.batch_size / 256, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)

    def loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.cfg.workers)

    def steps(self, n: int, profile_step: int | None = None):
        n_global = self.cfg.multicrop().n_global

        def forward(batch):
            self.model.prototypes.normalize()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                outputs = [self.model(x) for x in batch]
            return self.criterion([o.float() for o in outputs[:n_global]], [o.float() for o in outputs[n_global:]])

        def update():
            self.optimizer.step()
            self.optimizer.zero_grad()

        it = forever(self.loader())
        yield from phase_steps(it, n, profile_step, forward, lambda loss: loss.backward(), update)
        del it  # joins the workers


def ours_steps(shards: Path, cfg: PretrainConfig, n: int, profile_step: int | None = None):
    """The phases of ``medssl.train.pretrain.train_step`` (single process): its own ``build``,
    ``forward_loss``, ``backward`` and ``optimizer_step``, timed one by one; for the profile."""
    with tempfile.TemporaryDirectory(prefix="medssl-bench-steps-") as out:
        run = build(cfg.model_copy(update={"shards": [shards], "out": Path(out)}), init_distributed("cpu"))

        def forward(batch):
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr()
            loss, _, embeddings = forward_loss(run, batch)
            torch.isfinite(loss).item()
            run.optimizer.zero_grad(set_to_none=True)
            run.loss_fn.enqueue(embeddings)
            return loss

        it = forever(run.loader)
        yield from phase_steps(it, n, profile_step, forward, lambda loss: backward(run, loss),
                               lambda: optimizer_step(run))
        del it


def phase_steps(batches, n: int, profile_step: int | None, forward, backward, update):
    """``n`` steps timed phase by phase: waiting for ``next(batches)``, ``forward(batch) -> loss`` (loss
    included), ``backward(loss)``, ``update()`` (optimiser); step ``profile_step`` runs under torch.profiler."""
    last = time.perf_counter()
    for step in range(n):
        prof = _profiler() if step == profile_step else None
        if prof:
            prof.__enter__()
        batch = next(batches)
        t_data = time.perf_counter()
        loss = forward(batch)
        t_fwd = time.perf_counter()
        backward(loss)
        t_bwd = time.perf_counter()
        update()
        loss.item()
        now = time.perf_counter()
        if prof:
            prof.__exit__(None, None, None)
        yield {"data": t_data - last, "forward": t_fwd - t_data, "backward": t_bwd - t_fwd,
               "optimizer": now - t_bwd, "total": now - last, "profile": prof,
               "main_cpu": time.process_time(), "worker_cpu": children_cpu()}
        last = now


class OutsideLoad:
    """Cores kept busy by other processes (or stolen by the hypervisor) while the block ran: all busy
    CPU time of the machine (/proc/stat) less this process's and its finished children's."""

    cores = float("nan")

    @staticmethod
    def _busy() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> OutsideLoad:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0)) / wall


def children_cpu() -> float:
    """CPU seconds of this process's children so far: the live ones (DataLoader workers, from /proc)
    plus those already reaped. A worker's CPU time thus counts while it runs, not only once joined."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    try:
        pids = {int(pid) for task in Path("/proc/self/task").iterdir()
                for pid in (task / "children").read_text().split()}
    except OSError:
        return total
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Sleep until other processes kept at most ``threshold`` cores busy over one second, or ``max_wait``
    seconds have passed; returns the seconds waited. On a shared machine, load comes in bursts."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        with OutsideLoad() as meter:
            time.sleep(1.0)
        if not meter.cores > threshold:  # nan (no /proc/stat): do not wait
            break
    return time.perf_counter() - start


def forever(loader):
    """Batches over as many epochs as needed; each epoch starts new workers, as in training."""
    while True:
        yield from loader


def _profiler():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


# ------------------------------------------------------------------------------------- measurements


def augment_round(pipelines: dict, n: int) -> dict[str, float]:
    rates = {}
    for name, (transform, inputs) in pipelines.items():
        start = time.perf_counter()
        for i in range(n):
            transform(inputs[i % len(inputs)])
        rates[name] = n / (time.perf_counter() - start)
    return rates


def loader_rate(loader, batches: int, batch_size: int) -> float:
    """Images/s out of a DataLoader, timed from its first batch (worker start-up left out)."""
    it = forever(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - start)
    del it
    return rate


def ours_end_to_end(shards: Path, cfg: PretrainConfig, out: Path, warmup: int) -> list[float]:
    """Seconds of every step of ``pretrain`` itself after the warm-up, from its metrics.jsonl (log_every=1:
    each record's rate covers one step, from the end of the step before, data loading included)."""
    run = cfg.model_copy(update={"out": out})
    pretrain(run, show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return [cfg.batch_size / r["images_per_s"] for r in records if "images_per_s" in r and r["step"] > warmup]


def peer_end_to_end(shards: Path, cfg: PretrainConfig, warmup: int, steps: int, bf16: bool) -> list[float]:
    return [s["total"] for s in PeerRun(shards, cfg, bf16).steps(warmup + steps)][warmup:]


def steady_rate(step_seconds: list[float], batch_size: int) -> float:
    """Images/s of the median step: a burst of load from other processes that hits a few steps drops out."""
    return batch_size / statistics.median(step_seconds)


def phase_profile(shards: Path, cfg: PretrainConfig, warmup: int, steps: int, with_bf16_peer: bool,
                  quiet: float, max_wait: float) -> dict:
    """Per-step phase times (median over steady steps), worker CPU per step, top operators of one step."""
    runs = {OURS_FP32: lambda n, p: ours_steps(shards, cfg.model_copy(update={"precision": "fp32"}), n, p),
            OURS_BF16: lambda n, p: ours_steps(shards, cfg.model_copy(update={"precision": "bf16"}), n, p),
            PEER: lambda n, p: PeerRun(shards, cfg, bf16=False).steps(n, p)}
    if with_bf16_peer:
        runs[PEER_BF16] = lambda n, p: PeerRun(shards, cfg, bf16=True).steps(n, p)
    result = {}
    for name, run in runs.items():
        wait_for_quiet(quiet, max_wait)
        with OutsideLoad() as meter:
            records = list(run(warmup + steps + 1, warmup + steps))  # the last step runs under the profiler
        steady = records[warmup:-1]
        before = records[warmup - 1] if warmup else None
        phases = {k: statistics.median(r[k] for r in steady)
                  for k in ("data", "forward", "backward", "optimizer", "total")}
        table = records[-1]["profile"].key_averages().table(sort_by="self_cpu_time_total", row_limit=10,
                                                            max_name_column_width=40)
        cpu = {k: (steady[-1][k] - before[k]) / len(steady) if before else float("nan")
               for k in ("main_cpu", "worker_cpu")}
        result[name] = {"phases_s": phases, "main_cpu_s_per_step": cpu["main_cpu"],
                        "worker_cpu_s_per_step": cpu["worker_cpu"], "outside_load_cores": meter.cores,
                        "top_ops": table}
    return result


# ------------------------------------------------------------------------------------------- report


def fmt(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--shards", type=Path, default=None,
                        help=f"a `medssl ingest` output folder (default: {DEFAULT_SHARDS}, made if missing)")
    parser.add_argument("--source", type=Path, default=None,
                        help=f"what to ingest when the shards are missing (default: {DEFAULT_SOURCE}, "
                             "else pydicom-data)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="per step, both pipelines (default 64, the config default)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers, both pipelines (default 2, the config default)")
    parser.add_argument("--crops", choices=["cpu", "swav"], default="cpu",
                        help="multi-crop preset (default cpu: 2x96 + 4x48)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="end-to-end rounds, alternating the pipelines (default 3, at least 1)")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="steps left out of every end-to-end rate (default 2)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per pipeline and round (default 6)")
    parser.add_argument("--quiet", type=float, default=0.25,
                        help="a round is quiet if every end-to-end run in it saw at most this many cores busy with "
                             "other processes; the table uses quiet rounds when there are any (default 0.25)")
    parser.add_argument("--max-wait", type=float, default=20,
                        help="before each end-to-end or profile run, wait up to this many seconds for a second with "
                             "at most --quiet cores of outside load (default 20)")
    parser.add_argument("--extra-rounds", type=int, default=3,
                        help="rounds added while fewer than --rounds were quiet (default 3)")
    parser.add_argument("--budget", type=float, default=240,
                        help="no extra round starts that would end later than this many seconds after the start "
                             "(default 240)")
    parser.add_argument("--aug-images", type=int, default=200,
                        help="images per augmentation round and pipeline (default 200)")
    parser.add_argument("--aug-rounds", type=int, default=5, help="augmentation rounds (default 5)")
    parser.add_argument("--loader-batches", type=int, default=8,
                        help="batches timed per data-loading round (default 8)")
    parser.add_argument("--only", choices=["all", "augment", "end-to-end"], default="all")
    parser.add_argument("--peer-bf16", action="store_true",
                        help="also run lightly's pipeline with bf16 autocast + channels_last")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--profile", action="store_true",
                         help="always add the phase profile (default: when a target is missed)")
    profile.add_argument("--no-profile", action="store_true", help="never add the phase profile")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = parser.parse_args()
    if (min(args.rounds, args.steps, args.aug_rounds, args.aug_images, args.loader_batches, args.batch_size) < 1
            or args.warmup_steps < 0):
        parser.error("rounds, steps, batch sizes and image counts must be >= 1, warm-up steps >= 0")

    started = time.perf_counter()
    command = shlex.join(sys.orig_argv)
    info = machine_facts(("lightly", "timm", "torchvision", "Pillow", "numpy"))
    shards = ensure_shards(args.shards or DEFAULT_SHARDS, args.source)
    n_samples = json.loads((shards / "index.json").read_text())["samples"]
    if n_samples < args.batch_size:
        sys.exit(f"{shards} holds {n_samples} samples, fewer than one batch of {args.batch_size}: "
                 f"use --batch-size {n_samples} or more data")
    cfg = PretrainConfig(shards=[shards], crops=args.crops, batch_size=args.batch_size, workers=args.workers,
                         max_steps=args.warmup_steps + args.steps, log_every=1, checkpoint_every=10**9,
                         freeze_prototypes_steps=0,  # both pipelines update every parameter
                         warmup_steps=50)  # the default, named: a throughput run of a few steps is meant to be short
    crops = cfg.multicrop()
    crop_text = f"{crops.n_global}x{crops.global_size} + {crops.n_local}x{crops.local_size}"
    results: dict = {"command": command, "machine": info, "shards": str(shards), "samples": n_samples,
                     "batch_size": args.batch_size, "workers": args.workers, "crops": crop_text,
                     "config": cfg.model_dump(mode="json"), "rounds": {}}

    print(f"command: {command}")
    print(f"machine: {info['cpu']}, {info['usable_cores']} cores, {info['ram_gib']} GiB RAM, {info['os']}; "
          f"load average at start {', '.join(f'{x:.2f}' for x in info['load_average_at_start'])}")
    print(f"versions: python {info['python']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
          + f"; torch threads {info['torch_threads']}")
    print(f"shards: {shards} ({n_samples} samples); crops {crop_text}; batch size {args.batch_size}; "
          f"DataLoader workers {args.workers}; backbone {cfg.backbone} (ours in_chans=1, lightly in_chans=3); "
          f"heads {cfg.proj_hidden}-{cfg.proj_dim}, {cfg.n_prototypes} prototypes", flush=True)

    rows: list[tuple[str, str, str, float, float | None]] = []  # (measure, pipeline, unit, median, ratio)

    if args.only in ("all", "augment"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        samples = load_samples(shards, 64)
        ours = MultiCrop(crops)
        pipelines = {
            "medssl MultiCrop": (lambda item: ours(*item), samples),
            "lightly SwaVTransform": (swav_transform(crops), [to_pil(*s) for s in samples]),
            "lightly SwaVTransform + rotation": (swav_transform(crops, rotation=True), [to_pil(*s) for s in samples]),
        }
        augment_round(pipelines, 32)  # warm-up
        aug = {name: [] for name in pipelines}
        for _ in range(args.aug_rounds):
            for name, rate in augment_round(pipelines, args.aug_images).items():
                aug[name].append(rate)
        torch.set_num_threads(threads)
        results["rounds"]["augment_images_per_s"] = aug
        med = {k: statistics.median(v) for k, v in aug.items()}
        for name, rate in med.items():
            rows.append(("augmentation only (1 process, 1 thread)", name, "images/s", rate,
                         None if name.startswith("medssl") else med["medssl MultiCrop"] / rate))
        print(f"augmentation: done ({time.perf_counter() - started:.0f} s)", flush=True)

    e2e_ratio: dict[str, float] = {}
    if args.only in ("all", "end-to-end"):
        work = Path(tempfile.mkdtemp(prefix="medssl-bench-pretrain-"))
        loaders = {"medssl ShardStream + MultiCrop": [], "lightly Dataset + SwaVTransform": []}
        e2e = {OURS_FP32: [], OURS_BF16: [], PEER: []} | ({PEER_BF16: []} if args.peer_bf16 else {})
        step_s = {k: [] for k in e2e}  # seconds of every timed step, per round
        outside = {k: [] for k in e2e}  # cores busy with other processes during each run
        try:
            r, e2e_start, waited = 0, time.perf_counter(), 0.0
            while True:
                quiet = [i for i in range(r) if max(outside[k][i] for k in e2e) <= args.quiet]
                if r >= args.rounds and (len(quiet) >= args.rounds or r >= args.rounds + args.extra_rounds
                                         or time.perf_counter() - started + (time.perf_counter() - e2e_start) / r
                                         > args.budget):
                    break
                stream = ShardStream([shards], batch_size=args.batch_size, num_workers=args.workers, seed=r,
                                     shuffle_buffer=cfg.shuffle_buffer, transform=MultiCrop(crops))
                loaders["medssl ShardStream + MultiCrop"].append(
                    loader_rate(stream.loader(), args.loader_batches, args.batch_size))
                peer_data = ShardSamples(shards, swav_transform(crops))
                loaders["lightly Dataset + SwaVTransform"].append(loader_rate(
                    DataLoader(peer_data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                               num_workers=args.workers),
                    args.loader_batches, args.batch_size))
                runs = {OURS_FP32: lambda: ours_end_to_end(shards,
                                                           cfg.model_copy(update={"precision": "fp32", "seed": r}),
                                                           work / f"fp32-{r}", args.warmup_steps),
                        PEER: lambda: peer_end_to_end(shards, cfg, args.warmup_steps, args.steps, bf16=False),
                        OURS_BF16: lambda: ours_end_to_end(shards,
                                                           cfg.model_copy(update={"precision": "bf16", "seed": r}),
                                                           work / f"bf16-{r}", args.warmup_steps)}
                if args.peer_bf16:
                    runs[PEER_BF16] = lambda: peer_end_to_end(shards, cfg, args.warmup_steps, args.steps, bf16=True)
                for name, run in runs.items():  # ours and lightly's alternate
                    waited += wait_for_quiet(args.quiet, args.max_wait)
                    with OutsideLoad() as meter:
                        step_s[name].append(run())
                    outside[name].append(meter.cores)
                    e2e[name].append(steady_rate(step_s[name][-1], args.batch_size))
                r += 1
                print(f"end to end: round {r} done ({time.perf_counter() - started:.0f} s): "
                      + ", ".join(f"{k} {v[-1]:.1f}" for k, v in e2e.items()) + " images/s; outside load "
                      + ", ".join(f"{outside[k][-1]:.2f}" for k in e2e)
                      + f" cores; {waited:.0f} s waited for quiet so far", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        quiet = [i for i in range(r) if max(outside[k][i] for k in e2e) <= args.quiet]
        used = quiet or list(range(r))
        e2e_note = (f"{len(quiet)} of {r} rounds quiet (every run saw <= {args.quiet} cores of outside load); "
                    + ("the table uses those" if quiet else "none was, so the table uses all rounds: NOISY"))
        print(e2e_note, flush=True)
        results["rounds"]["end_to_end_outside_load_cores"] = outside
        results["rounds"]["quiet_rounds"] = quiet
        results["end_to_end_note"] = e2e_note
        results["rounds"]["loader_images_per_s"] = loaders
        results["rounds"]["end_to_end_images_per_s"] = e2e
        results["rounds"]["end_to_end_step_seconds"] = step_s
        med = {k: statistics.median(v) for k, v in loaders.items()}
        peer = med["lightly Dataset + SwaVTransform"]
        for name, rate in med.items():
            rows.append((f"data loading only ({args.workers} workers)", name, "images/s", rate,
                         None if name.startswith("lightly") else rate / peer))
        med = {k: statistics.median(v[i] for i in used) for k, v in e2e.items()}
        for name, rate in med.items():
            ratio = med[name] / med[PEER] if name.startswith("medssl") else None
            default = (OURS_BF16 if use_bf16(cfg.model_copy(update={"precision": "auto"}), torch.device("cpu"))
                       else OURS_FP32)
            label = {OURS_FP32: "medssl pretrain, fp32", OURS_BF16: "medssl pretrain, bf16 autocast",
                     PEER: "lightly SwAV, fp32", PEER_BF16: "lightly SwAV, bf16 autocast + channels_last"}[name]
            label += " (the default here)" if name == default else ""
            rows.append(("end to end (training incl. data loading)", label, "images/s", rate, ratio))
            if name == default:
                e2e_ratio[name] = ratio
        results["paired_round_ratios"] = {k: [e2e[k][i] / e2e[PEER][i] for i in used] for k in (OURS_FP32, OURS_BF16)}

    # ------------------------------------------------------------------------------------- output
    how = []
    if args.only != "end-to-end":
        how.append(f"{args.aug_rounds} augmentation rounds x {args.aug_images} images")
    if args.only != "augment":
        how.append(f"{len(used)} end-to-end rounds x ({args.warmup_steps} warm-up + {args.steps} timed steps), "
                   "rate of a run's median step")
    print(f"\n{'; '.join(how)}; median round; ratio = medssl / lightly (the plain lightly row of the same measure)\n")
    print("| measure | pipeline | images/s | medssl / lightly |")
    print("| --- | --- | ---: | ---: |")
    for measure, name, _, rate, ratio in rows:
        print(f"| {measure} | {name} | {fmt(rate)} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    results["table"] = [dict(measure=m, pipeline=n, images_per_s=r, ratio=q) for m, n, _, r, q in rows]

    checks = []
    aug_rows = [r for r in rows if r[1] == "lightly SwaVTransform"]
    if aug_rows:
        checks.append(("augmentation", aug_rows[0][4], TARGETS["augment"]))
    for name, ratio in e2e_ratio.items():
        checks.append((f"end to end, {name} (the default precision here)", ratio, TARGETS["end to end"]))
    print()
    for what, ratio, target in checks:
        print(f"target {what}: {ratio:.2f}x, needs >= {target:.1f}x: {'met' if ratio >= target else 'MISSED'}")
    if "paired_round_ratios" in results:
        for k, v in results["paired_round_ratios"].items():
            print(f"  {k} / lightly per round: " + ", ".join(f"{x:.2f}" for x in v))
    results["targets"] = [dict(what=w, ratio=r, target=t, met=r >= t) for w, r, t in checks]

    missed = any(r < t for w, r, t in checks if w.startswith("end"))
    if args.only != "augment" and (args.profile or (missed and not args.no_profile)):
        print(f"\nphase profile ({'asked for' if args.profile else 'an end-to-end target was missed'}): the same "
              f"components stepped by hand, median of {args.steps} steps after {args.warmup_steps} warm-up steps; "
              "seconds per step", flush=True)
        prof = phase_profile(shards, cfg, args.warmup_steps, args.steps, args.peer_bf16, args.quiet, args.max_wait)
        print("\n| pipeline | wait for data | forward + loss | backward | optimizer | step | main CPU-s | worker CPU-s "
              "| outside load (cores) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, p in prof.items():
            ph = p["phases_s"]
            print(f"| {name} | {ph['data']:.3f} | {ph['forward']:.3f} | {ph['backward']:.3f} | {ph['optimizer']:.3f} | "
                  f"{ph['total']:.3f} | {p['main_cpu_s_per_step']:.2f} | {p['worker_cpu_s_per_step']:.2f} | "
                  f"{p['outside_load_cores']:.2f} |")
        print()
        compute = {k: p["phases_s"]["forward"] + p["phases_s"]["backward"] + p["phases_s"]["optimizer"]
                   for k, p in prof.items()}
        peer_cpu = prof[PEER]["main_cpu_s_per_step"] + prof[PEER]["worker_cpu_s_per_step"]
        for name, p in prof.items():
            data_share = p["worker_cpu_s_per_step"] / (p["worker_cpu_s_per_step"] + p["main_cpu_s_per_step"])
            line = f"{name}: data loading (workers) {data_share:.0%} of the CPU time of a step"
            if name.startswith("medssl"):
                p["ratio_compute_only"] = compute[PEER] / compute[name]
                p["ratio_if_our_data_loading_were_free"] = peer_cpu / p["main_cpu_s_per_step"]
                line += (f"; training step alone (forward + backward + optimizer, wall) {p['ratio_compute_only']:.2f}x "
                         "lightly fp32's; if our data loading cost nothing: "
                         f"{p['ratio_if_our_data_loading_were_free']:.2f}x "
                         "(lightly's main + worker CPU-s over our main CPU-s per step; the cores are saturated)")
            print(line)
        for name, p in prof.items():
            print(f"\ntop operators of one step, {name}:\n{p['top_ops']}")
        results["profile"] = prof

    results["wall_s"] = time.perf_counter() - started
    print(f"\nbenchmark wall time {results['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
