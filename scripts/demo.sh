#!/usr/bin/env bash
# The main job: set up, then ingest a sample archive of real DICOM files of many modalities and encodings
# (the pydicom-data package installed by setup) plus ../shared/data when present, into demo-out/shards,
# then writes the HTML report demo-out/shards/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
inputs=("$(.venv/bin/python -c 'import data_store, os; print(os.path.join(os.path.dirname(data_store.__file__), "data"))')")
for d in ../shared/data/head-ct-hemorrhage ../shared/data/brain-tumor-mri; do
  [ -d "$d" ] && inputs+=("$d")
done
.venv/bin/medssl ingest "${inputs[@]}" --out demo-out/shards "$@"
.venv/bin/medssl report demo-out/shards --quiet
