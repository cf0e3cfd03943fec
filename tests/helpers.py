"""Small builders of test inputs and readers of ingest outputs, shared by several test modules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from medssl.shard_format import read_shard


def shard_samples(out: Path) -> dict[str, tuple[str, dict]]:
    """key -> (sha256 of the stored PNG bytes, metadata) over all shards of an ingest output."""
    found = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for s in read_shard(shard):
            assert s.key not in found, f"sample {s.key} written twice"
            found[s.key] = (hashlib.sha256(s.pixels).hexdigest(), s.meta)
    return found


def manifest(out: Path) -> list[dict]:
    from medssl.ingest.report import read_manifest

    return list(read_manifest(out))


def write_ct_dicom(path: Path, hu: np.ndarray, **tags) -> None:
    """A real CT DICOM file (pydicom) storing ``hu`` with rescale intercept -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelSpacing = [0.5, 0.5]
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.clip(hu + 1024, 0, 65535).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_blob_task(root: Path, with_ct: bool = True) -> Path:
    """A task CSV of 32 images, half with a bright blob (label ``blob``, else ``clear``), two per patient
    group; every other pair CT DICOM in HU if ``with_ct``, else all PNG. Returns the CSV's path."""
    import csv

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :48]
    rows = []
    for i in range(32):
        positive = i % 2 == 0
        cy, cx = rng.integers(12, 28), rng.integers(12, 36)
        blob = positive * ((yy - cy) ** 2 + (xx - cx) ** 2 < 49).astype(float)
        if with_ct and i % 4 >= 2:
            name = f"ct{i}.dcm"
            write_ct_dicom(root / name, 20 + 60 * blob + rng.normal(0, 5, blob.shape))
        else:
            name = f"xr{i}.png"
            Image.fromarray(np.clip(60 + 150 * blob + rng.normal(0, 10, blob.shape), 0, 255).astype(np.uint8)).save(
                root / name)
        rows.append((name, "blob" if positive else "clear", f"patient{i // 2}"))
    with open(root / "task.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group"), *rows])
    return root / "task.csv"


class FaultProxy:
    """A TCP proxy in front of a real server (moto's S3) that goes down the moment a request matches
    ``trigger`` (a regex on the request's first line), as a store does in an outage: that connection and
    every open one are cut and new ones refused until ``up()``. A fault injector, not a fake: every request
    that gets through is answered by the real server."""

    def __init__(self, target_port: int, trigger: str | None = None, outage_s: float | None = None):
        import re
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target = target_port
        self.trigger = re.compile(trigger.encode()) if trigger else None
        self.outage_s = outage_s  # None: down until up() is called
        self.tripped = threading.Event()
        self.outages = 0
        self._conns: list = []
        self._lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up()

    def up(self) -> None:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._listener = s
        self.tripped.clear()
        self._threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        self.tripped.set()
        self.outages += 1
        self.trigger = None
        if self.outage_s is not None:
            self._threading.Timer(self.outage_s, self.up).start()
        with self._lock:
            for c in [self._listener, *self._conns]:
                try:
                    c.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = self._socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, server]
            self._threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            self._threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.trigger is not None and self.trigger.match(data):
                    self.down()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for c in (src, dst):
                try:
                    c.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass


def downstream_metrics(**fields) -> dict:
    """A complete metrics.json record (``artifacts.DownstreamMetrics``) for tests that fake finished runs:
    these defaults, with ``fields`` over them."""
    history = fields.get("history", [{"epoch": 1, "step": 10, "val_auc": 0.7}])
    last = history[-1] if history else {"epoch": 0, "step": 0, "val_auc": 0.7}
    record = {"test_auc": 0.8, "test_auc_ci": [0.75, 0.85], "test_auc_per_label": {}, "test_auc_per_label_ci": {},
              "test_accuracy": None, "best_val_auc": last["val_auc"],
              "best_epoch": last["epoch"], "best_step": last["step"], "target_auc": None,
              "steps_to_target": None, "steps": last["step"], "epochs": last["epoch"],
              "stopped_early": False, "status": "completed", "diverged": None, "train_seconds": 1.0,
              "history": history, "files": {}, "mode": "finetune", "init": {"init": "scratch"}, "label_fraction": 1.0,
              "seed": 0, "task": {"csv": "task.csv", "labeled_train": 10, "images": {"test": 8}},
              "bootstrap_resamples": 0, "device": "cpu", "medssl_version": "0", "config": {}}
    return {**record, **fields}


def robustness_record(**fields) -> dict:
    """A complete robustness.json record (``artifacts.RobustnessReport``), ``fields`` over these defaults."""
    sweeps = fields.get("sweeps", {})
    worst = {name: min(points, key=lambda p: p["auc"]) for name, points in sweeps.items()}
    record = {"clean_auc": 0.8, "sweeps": sweeps, "worst": worst, "test_images": 8, "split": "test",
              "task": "task.csv", "run": "run", "skipped": {}, "seed": 0}
    return {**record, **fields}
