"""``medssl ingest``: an archive of medical images -> streamable tar shards + manifest + report.

Data flow: plan.py (scan, hash, de-duplicate, cut into work units) -> engine.py (local pool or Ray)
runs chunk.py on each unit, which runs pipeline.py on each file and writes shards -> report.py merges
the per-unit manifests into manifest.jsonl, index.json and report.md. run.py ties them together.
"""

from medssl.ingest.run import IngestSummary, ingest

__all__ = ["IngestSummary", "ingest"]
