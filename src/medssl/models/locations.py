"""Where a run's shard folders are: recorded in its card at pretraining, found again at export.

Apart from ``lineage`` (which reads the ingest manifests) so that pretraining, which records locations,
does not import ingest.
"""

from __future__ import annotations

import os
from pathlib import Path

from medssl import storage


class LocationError(RuntimeError):
    """A shard folder the card names is nowhere it was looked for."""


def shard_location(folder: str | Path, run_folder: str | Path) -> dict[str, str]:
    """Where a run's shard folder is, recorded in its card: a URL as it is; a local folder as an absolute
    path and relative to the run folder, so that the run can be used from any folder and moved together
    with its dataset."""
    if storage.is_url(folder):
        return {"url": str(folder)}
    absolute = Path(folder).resolve()
    location = {"path": str(absolute)}
    if not storage.is_url(run_folder):
        location["from_run"] = os.path.relpath(absolute, Path(run_folder).resolve())
    return location


def locate_shards(run_folder: str | Path, card: dict) -> list[str | Path]:
    """The shard folders of a run, found from its card wherever the command runs: at their absolute path,
    else relative to the run folder (run and dataset moved together). Cards from before locations were
    recorded hold paths as given to ``pretrain``; a relative one is looked for relative to the folder
    pretrain ran in (the run folder minus the ``out`` it was given) and to this one. ``LocationError``
    says, for a folder found nowhere, every place that was looked at."""
    data, config = card.get("data", {}), card.get("config", {})
    locations = data.get("shard_locations") or [{"given": s} for s in config.get("shards") or []]
    found = []
    for loc in locations:
        if "url" in loc:
            found.append(loc["url"])
            continue
        tried = [Path(loc["path"])] if "path" in loc else []
        if "from_run" in loc and not storage.is_url(run_folder):
            tried.append(Path(os.path.normpath(Path(run_folder).resolve() / loc["from_run"])))
        if "given" in loc:
            given = Path(loc["given"])
            if given.is_absolute():
                tried.append(given)
            else:
                out = Path(str(config.get("out") or ""))
                run = Path(run_folder).resolve() if not storage.is_url(run_folder) else None
                if run is not None and not out.is_absolute() and out.parts and run.parts[-len(out.parts):] == out.parts:
                    tried.append(Path(*run.parts[:-len(out.parts)]) / given)
                tried.append(Path.cwd() / given)
        hit = next((p for p in tried if (p / "index.json").is_file()), None)
        if hit is None:
            shown = loc.get("path") or loc.get("given")
            raise LocationError(f"the run's shard folder {shown} is not where its card says: looked at "
                               + ", ".join(map(str, dict.fromkeys(tried)))
                               + "; it moved or was deleted: name it with --shards")
        found.append(hit)
    return found
