"""The data lineage of a pretraining run: which source files (by SHA-256) and how many of each modality.

The ingest manifest (``manifest/chunk-*.jsonl`` in each ingest output) holds one row per input file with
its content's SHA-256, status, modality and sample keys; every sample in the shards comes from a row
with status ``ingested``. So the files a run's pretraining pool held are the ingested rows of the ingest
outputs its card names. Only hashes and counts leave this module: never a path (the manifest's
``path`` is not read).

A dataset can grow after a run was trained on it (a later ``medssl ingest`` adds a generation). The
manifest then lists files the run never saw, and nothing records which generation the run used; the
image count the run's card recorded is compared with the manifest's, and a mismatch is an error
rather than a wrong list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medssl import storage
from medssl.ingest.report import read_manifest


class LineageError(RuntimeError):
    """The lineage of a run cannot be stated truthfully from the files at hand."""


@dataclass
class Lineage:
    sources: list[str]                     # sorted, unique SHA-256 hex digests of the source files
    images: int                            # 2D samples the pool held
    # modality -> {"files", "images"}; a file ingested into two of the outputs counts in each
    by_modality: dict[str, dict[str, int]] = field(default_factory=dict)


def run_lineage(shard_folders: list[str | Path], expected_images: int) -> Lineage:
    """Lineage of a pool made of the ingest outputs ``shard_folders``; ``expected_images`` is what the
    run's card recorded (``data.samples``), checked against the manifests."""
    sources: set[str] = set()
    images = 0
    by_modality: dict[str, dict[str, int]] = {}
    for folder in shard_folders:
        if not storage.exists(storage.join(folder, "manifest")):
            raise LineageError(f"{folder} has no manifest/ folder: is it a `medssl ingest` output? (If the "
                               "shards moved since pretraining, name their folder with --shards.)")
        for row in read_manifest(folder):
            if row.get("status") != "ingested" or not row.get("samples"):
                continue
            sources.add(row["sha256"])
            images += len(row["samples"])
            counts = by_modality.setdefault(row["modality"], {"files": 0, "images": 0})
            counts["files"] += 1
            counts["images"] += len(row["samples"])
    if images != expected_images:
        raise LineageError(
            f"the manifests of {', '.join(map(str, shard_folders))} list {images} images, the run's card "
            f"{expected_images}: the data changed since pretraining (a later ingest added files?), so which "
            "source files the run saw cannot be told")
    return Lineage(sorted(sources), images, dict(sorted(by_modality.items())))


def sources_text(lineage: Lineage) -> str:
    """The ``sources.sha256`` file: one lower-case hex SHA-256 per line, sorted (no file names)."""
    return "".join(f"{digest}\n" for digest in lineage.sources)
