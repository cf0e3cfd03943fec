"""``medssl ingest``: an archive of medical images -> streamable tar shards + manifest + report.

Data flow: listing.py (stream the inputs in one sorted order) -> plan.py (deal blocks of the listing to
work units, saved in parts) -> engine.py (local pool or Ray) runs chunk.py on each unit, which runs
pipeline.py on each file in a decode worker (hash, skip known content, decode) and writes shuffled shards
and a manifest part -> report.py settles duplicates across units (dedup.py), extends index.json and
writes report.md. run.py ties them together.
"""

import importlib

# Lazy, as in ``medssl.downstream``: the decode worker imports ``medssl.ingest.pipeline`` and must not pay
# for the driver's modules (run, plan, report, engine: about a third of its start-up) through this package.
_EXPORTS = {"IngestSummary": "run", "ingest": "run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medssl.ingest.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medssl.ingest' has no attribute {name!r}")
