#!/usr/bin/env bash
# The main job: set up, then `medssl demo`: generate a multi-modality phantom archive (DICOM of several
# encodings, NIfTI), ingest it, pretrain briefly, train a head-CT hemorrhage task from scratch and from the
# pretrained encoder, sweep robustness, and write demo-out/report.html (the last line printed says where).
# Extra arguments are passed on, e.g. `bash scripts/demo.sh --out /tmp/demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/medssl demo "$@"
