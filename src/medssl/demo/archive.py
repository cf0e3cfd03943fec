"""The demo archive: phantom files of every modality, lesion tasks as task CSVs, and lesion masks.

Layout of ``out_dir`` (task CSV paths are relative to ``out_dir``, as the task-CSV contract wants):

    archive/                          only image files: what ``medssl ingest`` reads
      ct-head/HCT-000/slice-0.dcm       axial head CT series, one file per slice
      ct-chest/CCT-000.dcm              chest CT volumes: Enhanced CT multi-frame, or CCT-001.nii.gz
      radiograph/CXR-000.dcm            chest radiographs, CR or DX, MONOCHROME1 or 2
      mr/MRH-000/t1.dcm, t2.dcm, t1c.dcm   one brain level in three weightings
      mr/MRV-000-t2.nii.gz              T2 brain volumes
      us/US-000.dcm, us/US-C00.dcm      ultrasound frames (RGB, YBR_FULL, grey) and cine loops
    masks/<same path>.png             lesion mask (0/255) of every image in a task
    task-ct-hemorrhage.csv            head CT slices: hemorrhage / normal
    task-radiograph-nodule.csv        radiographs: nodule / normal
    task-mr-enhancement.csv           T1 post-contrast slices: enhancing_lesion / normal

Every task is balanced, has a ``group`` column (the phantom patient id) and a ``split`` column that
keeps each patient in one split, stratified by whether the patient has a lesion.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medssl.demo import phantoms, writers
from medssl.demo.writers import Identity

CHEST_CT_SLICES = 16
MR_VOLUME_SLICES = 12
US_CINE_FRAMES = 8
HEAD_WINDOW = (40.0, 80.0)    # brain window, written as the files' display hint
CHEST_WINDOW = (-600.0, 1500.0)  # lung window
# Random stream of each kind of phantom; stream 0 makes the archive's decisions (labels, splits).
_STREAMS = {"HCT": 1, "CCT": 2, "CXR": 3, "MRH": 4, "MRV": 5, "US": 6, "USC": 7}


@dataclass
class DemoArchive:
    """What :func:`generate_demo_archive` wrote."""

    root: Path                                   # out_dir
    archive: Path                                # the image files (input of ``medssl ingest``)
    tasks: dict[str, Path]                       # task name -> task CSV
    files: dict[str, int] = field(default_factory=dict)   # files per DICOM modality (NIfTI: CT or MR)
    images: dict[str, int] = field(default_factory=dict)  # 2D images (slices, frames) per modality


@dataclass
class _Task:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # path, label, group
    lesion_groups: set[str] = field(default_factory=set)  # patients with a lesion: splits are stratified by it


class _Builder:
    """Writes files under ``root``, counting them, collecting task rows and lesion masks."""

    def __init__(self, root: Path, seed: int):
        self.root, self.seed = root, seed
        self.files: Counter[str] = Counter()
        self.images: Counter[str] = Counter()
        self.tasks: dict[str, _Task] = {}

    def rng(self, kind: str, index: int) -> np.random.Generator:
        # One stream per phantom: a patient's images do not change when the counts of others change.
        return np.random.default_rng([self.seed, _STREAMS[kind], index])

    def path(self, relative: str) -> Path:
        path = self.root / "archive" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def wrote(self, modality: str, images: int = 1) -> None:
        self.files[modality] += 1
        self.images[modality] += images

    def label(self, task: str, relative: str, label: str, group: str, lesion: np.ndarray,
              patient_has_lesion: bool) -> None:
        """Add a task row and write the image's lesion mask (all zero for a normal image)."""
        entry = self.tasks.setdefault(task, _Task())
        entry.rows.append((f"archive/{relative}", label, group))
        if patient_has_lesion:
            entry.lesion_groups.add(group)
        mask = self.root / "masks" / f"{relative}.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lesion.astype(np.uint8) * 255).save(mask)


def _split_groups(rng: np.random.Generator, groups: list[str], lesion_groups: set[str]) -> dict[str, str]:
    """60/20/20 train/val/test by patient, separately for patients with and without lesions."""
    split = {}
    with_lesion = sorted(g for g in groups if g in lesion_groups)
    for stratum in (with_lesion, sorted(set(groups) - set(with_lesion))):
        order = [stratum[i] for i in rng.permutation(len(stratum))]
        n_test = n_val = max(1, round(0.2 * len(order)))
        for i, g in enumerate(order):
            split[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _write_task_csv(path: Path, task: _Task, rng: np.random.Generator) -> None:
    groups = sorted({g for _, _, g in task.rows})
    split = _split_groups(rng, groups, task.lesion_groups)
    with open(path, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["path", "label", "split", "group"])
        for p, label, group in task.rows:
            out.writerow([p, label, split[group], group])


def _balanced_flags(rng: np.random.Generator, n: int) -> np.ndarray:
    """Half of ``n`` patients get a lesion, in a random order (so no file format goes with a label)."""
    return rng.permutation(np.arange(n) < n // 2)


def _round_robin(rng: np.random.Generator, by_group: dict[str, list], n: int, first: set[str]) -> list:
    """``n`` items drawn one group at a time, so every group gives one before any gives two; in each
    round the groups in ``first`` give theirs before the others."""
    pools = [[items[j] for j in rng.permutation(len(items))] for items in by_group.values()]
    names = list(by_group)
    order = sorted(rng.permutation(len(pools)), key=lambda j: names[j] not in first)  # stable: random within
    chosen: list = []
    while len(chosen) < n:
        for j in order:
            if pools[j] and len(chosen) < n:
                chosen.append(pools[j].pop())
    return chosen


def _head_ct(b: _Builder, n: int, size: int, rng: np.random.Generator) -> None:
    syntaxes = [ExplicitVRLittleEndian, RLELossless, ExplicitVRLittleEndian, JPEG2000Lossless]
    positive, negative = [], {}
    for i, hemorrhage in enumerate(_balanced_flags(rng, n)):
        ident = Identity.of(b.seed, f"HCT-{i:03d}", "head CT")
        p = phantoms.head_ct(b.rng("HCT", i), size, hemorrhage=bool(hemorrhage))
        for k in range(p.image.shape[0]):
            relative = f"ct-head/{ident.patient}/slice-{k}.dcm"
            writers.write_ct_slice(b.path(relative), p.image[k], ident, k + 1, p.spacing_mm[1:], p.z_mm[k],
                                   "HEAD", HEAD_WINDOW, syntaxes[i % len(syntaxes)])
            b.wrote("CT")
            item = (relative, ident.patient_id, p.lesion[k], bool(hemorrhage))
            (positive if p.lesion[k].any() else negative.setdefault(ident.patient_id, [])).append(item)
    # Every slice with haemorrhage and as many normal slices, spread over all patients, the patients
    # without haemorrhage first: there are about as many positive slices as such patients or more (one
    # or two per haematoma), so (nearly) each gives a normal slice, and every split (stratified by
    # patient) gets normal slices even when most haematomas span one slice. The other slices stay
    # unlabeled, in the pretraining pool only.
    n_negative = min(len(positive), sum(len(v) for v in negative.values()))
    normal_patients = {group for group, items in negative.items() if not items[0][3]}
    labeled = sorted(positive + _round_robin(rng, negative, n_negative, normal_patients), key=lambda item: item[0])
    for relative, group, lesion, patient_has_lesion in labeled:
        label = "hemorrhage" if lesion.any() else "normal"
        b.label("ct-hemorrhage", relative, label, group, lesion, patient_has_lesion)


def _chest_ct(b: _Builder, n: int, size: int) -> None:
    for i in range(n):
        patient = f"CCT-{i:03d}"
        rng = b.rng("CCT", i)
        p = phantoms.chest_ct(rng, size, CHEST_CT_SLICES, n_nodules=int(rng.integers(0, 3)))
        if i % 2:
            writers.write_nifti(b.path(f"ct-chest/{patient}.nii.gz"), p.image, p.spacing_mm, p.z_mm[0])
        else:
            syntax = ExplicitVRLittleEndian if i % 4 == 0 else RLELossless
            ident = Identity.of(b.seed, patient, "chest CT")
            writers.write_ct_volume(b.path(f"ct-chest/{patient}.dcm"), p.image, ident, p.spacing_mm, p.z_mm,
                                    "CHEST", CHEST_WINDOW, syntax)
        b.wrote("CT", CHEST_CT_SLICES)


# Radiograph file variants, cycled: (modality, photometric, VOI window written, transfer syntax).
_RADIOGRAPH_VARIANTS = [
    ("CR", "MONOCHROME1", True, JPEG2000Lossless),
    ("DX", "MONOCHROME2", True, ExplicitVRLittleEndian),
    ("CR", "MONOCHROME1", True, ExplicitVRLittleEndian),
    ("DX", "MONOCHROME2", False, RLELossless),
]


def _radiographs(b: _Builder, n: int, size: int, rng: np.random.Generator) -> None:
    for i, nodule in enumerate(_balanced_flags(rng, n)):
        ident = Identity.of(b.seed, f"CXR-{i:03d}", "chest radiograph")
        p = phantoms.radiograph(b.rng("CXR", i), size, nodule=bool(nodule))
        modality, photometric, windowed, syntax = _RADIOGRAPH_VARIANTS[i % len(_RADIOGRAPH_VARIANTS)]
        # The window a technologist would leave: the body's range of detector values.
        low, high = np.percentile(p.image[p.tissue != phantoms.Tissue.AIR], [1, 99])
        relative = f"radiograph/{ident.patient}.dcm"
        writers.write_radiograph(b.path(relative), p.image, ident, modality, photometric, p.spacing_mm,
                                 ((low + high) / 2, high - low) if windowed else None, syntax)
        b.wrote(modality)
        label = "nodule" if nodule else "normal"
        b.label("radiograph-nodule", relative, label, ident.patient_id, p.lesion, bool(nodule))


def _mr(b: _Builder, n: int, n_volumes: int, size: int, rng: np.random.Generator) -> None:
    syntaxes = [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless]
    for i, lesion in enumerate(_balanced_flags(rng, n)):
        patient = f"MRH-{i:03d}"
        weighted = phantoms.mr_head(b.rng("MRH", i), size, enhancing_lesion=bool(lesion))
        for number, (weighting, p) in enumerate(weighted.items(), start=1):
            relative = f"mr/{patient}/{weighting.lower()}.dcm"
            series = Identity.of(b.seed, patient, f"brain MR {weighting}", series_number=number)
            writers.write_mr_slice(b.path(relative), p.image[0], series, 1, weighting, p.spacing_mm[1:], p.z_mm[0],
                                   syntaxes[i % len(syntaxes)])
            b.wrote("MR")
            if weighting == "T1C":
                enhancing = bool(p.lesion[0].any())
                b.label("mr-enhancement", relative, "enhancing_lesion" if enhancing else "normal",
                        series.patient_id, p.lesion[0], bool(lesion))
    for i in range(n_volumes):
        p = phantoms.mr_head(b.rng("MRV", i), size, MR_VOLUME_SLICES, weightings=("T2",))["T2"]
        writers.write_nifti(b.path(f"mr/MRV-{i:03d}-t2.nii.gz"), p.image, p.spacing_mm, p.z_mm[0])
        b.wrote("MR", MR_VOLUME_SLICES)


def _ultrasound(b: _Builder, n: int, size: int) -> None:
    colours = ["RGB", "YBR_FULL", "MONOCHROME2"]
    for i in range(n):
        p = phantoms.ultrasound(b.rng("US", i), size)
        ident = Identity.of(b.seed, f"US-{i:03d}", "US")
        writers.write_ultrasound(b.path(f"us/{ident.patient}.dcm"), p.image, ident, 1, colours[i % len(colours)])
        b.wrote("US")
    # Cine loops: an RGB one RLE-compressed (the usual for colour cine), a grey one uncompressed.
    for i, (colour, syntax) in enumerate([("RGB", RLELossless), ("MONOCHROME2", ExplicitVRLittleEndian)]):
        p = phantoms.ultrasound(b.rng("USC", i), size, US_CINE_FRAMES)
        ident = Identity.of(b.seed, f"US-C{i:02d}", "US cine")
        writers.write_ultrasound(b.path(f"us/{ident.patient}.dcm"), p.image, ident, 1, colour, transfer_syntax=syntax)
        b.wrote("US", US_CINE_FRAMES)


def generate_demo_archive(out_dir: Path, n_patients: int = 32, size: int = 128, seed: int = 0) -> DemoArchive:
    """Write the demo archive (see the module docstring for the layout) and return what was written.

    ``n_patients`` head CT patients (6 slices each; the main task), as many radiographs, half as many
    MR patients (at least 6), one chest CT volume per 8 patients (at least 2) and ultrasound in
    proportion. The default (32 patients, 128 px) is 284 files holding 380 2D images; about half of
    the DICOM files are compressed (RLE Lossless, JPEG 2000 Lossless). The same ``seed`` writes the
    same bytes.
    """
    if n_patients < 6:
        raise ValueError(f"n_patients={n_patients}: need at least 6, so that every split of every task gets "
                         "patients with and without lesions")
    out_dir = Path(out_dir)
    archive = out_dir / "archive"
    if archive.exists() and any(archive.iterdir()):
        raise FileExistsError(f"{archive} already holds files: choose another output folder, "
                              "or delete it to regenerate")
    b = _Builder(out_dir, seed)
    decisions = np.random.default_rng([seed, 0])
    _head_ct(b, n_patients, size, decisions)
    _chest_ct(b, max(2, n_patients // 8), size)
    _radiographs(b, n_patients, size, decisions)
    _mr(b, max(6, n_patients // 2), max(1, n_patients // 16), size, decisions)
    _ultrasound(b, max(3, n_patients // 8), size)
    tasks = {}
    for name, task in b.tasks.items():
        tasks[name] = out_dir / f"task-{name}.csv"
        _write_task_csv(tasks[name], task, decisions)
    return DemoArchive(out_dir, archive, tasks, dict(b.files), dict(b.images))
