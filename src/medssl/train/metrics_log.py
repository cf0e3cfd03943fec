"""The pretraining log: metrics.jsonl (one JSON row per logged step) and TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path

from medssl import storage
from medssl.artifacts import METRICS_LOG
from medssl.atomic import atomic_write_text


class MetricsLog:
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
        self.path = storage.join(out, METRICS_LOG)
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
