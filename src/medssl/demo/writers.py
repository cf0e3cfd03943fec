"""Phantom images as real files: DICOM through pydicom, NIfTI through nibabel.

Each writer sets what a reader relies on for its modality: the SOP class, Modality, the image pixel
module, rescale slope/intercept for CT (stored = HU + 1024), pixel spacing, VOI windows for
radiographs, photometric interpretations (MONOCHROME1/2, RGB, YBR_FULL), and the transfer syntax:
uncompressed, RLE Lossless (pydicom's own encoder) or JPEG 2000 Lossless (pylibjpeg-openjpeg).
JPEG-LS is not offered: pydicom can encode it only with the pyjpegls package, which medssl does not
depend on.

Identities are made up ("PHANTOM^HCT-003"); UIDs are derived from them and the archive's seed, so a
seed reproduces every file byte for byte.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

HU_OFFSET = 1024  # CT stored value = HU + 1024 (rescale intercept -1024): unsigned 12-bit covers -1024..3071 HU
MANUFACTURER = "medssl phantom"
# A sepia display map, as some scanners store B-mode images: grey in, colour out.
US_TINT = np.array([1.0, 0.93, 0.82])


@dataclass(frozen=True)
class Identity:
    """Made-up patient, study and series of phantom files, with UIDs derived from them."""

    patient: str               # e.g. "HCT-003"
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    series_number: int

    @classmethod
    def of(cls, seed: int, patient: str, series: str, series_number: int = 1) -> Identity:
        return cls(patient, _uid("medssl-demo", str(seed), patient, "study"),
                   _uid("medssl-demo", str(seed), patient, "series", series),
                   _uid("medssl-demo", str(seed), patient, "frame-of-reference"), series_number)

    @property
    def patient_id(self) -> str:
        return f"PHANTOM-{self.patient}"

    def instance_uid(self, instance: int) -> str:
        return _uid(self.series_uid, str(instance))


def _uid(*parts: str) -> str:
    """A UID under the 2.25 root (PS3.5 B.2: a UUID as an integer) from a name-based UUID: reproducible."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}"


def _dataset(sop_class: UID, ident: Identity, modality: str, instance: int, description: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ident.instance_uid(instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.PatientName = f"PHANTOM^{ident.patient}"
    ds.PatientID = ident.patient_id
    ds.PatientSex = "O"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.SeriesNumber = ident.series_number
    ds.InstanceNumber = instance
    ds.SeriesDescription = description
    return ds


def _save(ds: FileDataset, path: Path, pixels: np.ndarray, photometric: str, bits_stored: int,
          transfer_syntax: UID) -> None:
    """Set the image pixel module from ``pixels`` ((frames,) rows, columns (, 3)) and write the file."""
    colour = photometric in ("RGB", "YBR_FULL")
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
    else:
        # The instance UID is derived from the phantom's identity: keep it (reproducible files).
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _ct_stored(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu) + HU_OFFSET, 0, 4095).astype(np.uint16)


def _plane(ds: Dataset, spacing_mm: tuple[float, float], shape: tuple[int, int], z_mm: float) -> None:
    """Axial plane geometry: rows toward posterior, columns toward the patient's left, centred on 0."""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [round(-(shape[1] - 1) / 2 * spacing_mm[1], 4),
                               round(-(shape[0] - 1) / 2 * spacing_mm[0], 4), round(z_mm, 4)]
    ds.PixelSpacing = [round(s, 6) for s in spacing_mm]


def write_ct_slice(path: Path, hu: np.ndarray, ident: Identity, instance: int, spacing_mm: tuple[float, float],
                   z_mm: float, body_part: str, window: tuple[float, float],
                   transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    """One axial CT slice (CT Image Storage) from HU values: stored = HU + 1024, intercept -1024."""
    ds = _dataset(CTImageStorage, ident, "CT", instance, f"phantom {body_part.lower()} CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = body_part
    ds.SliceThickness = 5.0
    ds.SliceLocation = round(z_mm, 4)
    _plane(ds, spacing_mm, hu.shape, z_mm)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -HU_OFFSET, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = window
    _save(ds, path, _ct_stored(hu), "MONOCHROME2", 12, transfer_syntax)


def write_ct_volume(path: Path, hu: np.ndarray, ident: Identity, spacing_mm: tuple[float, float, float],
                    z_mm: tuple[float, ...], body_part: str, window: tuple[float, float],
                    transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    """A CT volume as one multi-frame file (Enhanced CT Image Storage).

    Rescale, pixel spacing, orientation and window sit in the shared functional groups, the slice
    positions in the per-frame groups, as enhanced multi-frame scanners write them.
    """
    ds = _dataset(EnhancedCTImageStorage, ident, "CT", 1, f"phantom {body_part.lower()} CT volume")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.BodyPartExamined = body_part
    measures, transform, orientation, voi = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = [round(s, 6) for s in spacing_mm[1:]]
    measures.SliceThickness = spacing_mm[0]
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = -HU_OFFSET, 1, "HU"
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    voi.WindowCenter, voi.WindowWidth = window
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    shared.PlaneOrientationSequence = [orientation]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in z_mm:
        position, item = Dataset(), Dataset()
        geometry = Dataset()
        _plane(geometry, spacing_mm[1:], hu.shape[1:], z)
        position.ImagePositionPatient = geometry.ImagePositionPatient
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    _save(ds, path, _ct_stored(hu), "MONOCHROME2", 12, transfer_syntax)


def write_mr_slice(path: Path, signal: np.ndarray, ident: Identity, instance: int, weighting: str,
                   spacing_mm: tuple[float, float], z_mm: float, transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    """One axial MR slice (MR Image Storage) in scanner units, with the weighting's TR/TE."""
    tr_te = {"T1": (500.0, 15.0), "T1C": (500.0, 15.0), "T2": (4000.0, 100.0)}[weighting]
    description = {"T1": "T1 SE", "T1C": "T1 SE post-contrast", "T2": "T2 TSE"}[weighting]
    ds = _dataset(MRImageStorage, ident, "MR", instance, description)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.BodyPartExamined = "HEAD"
    ds.ScanningSequence, ds.SequenceVariant = "SE", "NONE"
    ds.RepetitionTime, ds.EchoTime = tr_te
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = 5.0
    if weighting == "T1C":
        ds.ContrastBolusAgent = "gadolinium (simulated)"
    _plane(ds, spacing_mm, signal.shape, z_mm)
    _save(ds, path, np.clip(np.rint(signal), 0, 4095).astype(np.uint16), "MONOCHROME2", 12, transfer_syntax)


def write_radiograph(path: Path, detector: np.ndarray, ident: Identity, modality: str, photometric: str,
                     spacing_mm: tuple[float, float], window: tuple[float, float] | None,
                     transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    """A chest radiograph (CR: Computed Radiography, DX: Digital X-Ray for presentation).

    ``detector`` holds 12-bit values where high means dense. MONOCHROME2 stores them as they are;
    MONOCHROME1 (common on CR plates) stores 4095 - value, so its low stored values display white,
    and its ``window`` (given in detector values) is mirrored the same way.
    """
    sop = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}[modality]
    ds = _dataset(sop, ident, modality, 1, "phantom chest PA")
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [round(s, 6) for s in spacing_mm]
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    stored = np.clip(np.rint(detector), 0, 4095).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    if window is not None:
        center, width = window
        ds.WindowCenter = round(4095 - center if photometric == "MONOCHROME1" else center, 2)
        ds.WindowWidth = round(width, 2)
    _save(ds, path, stored, photometric, 12, transfer_syntax)


def write_ultrasound(path: Path, grey: np.ndarray, ident: Identity, instance: int, photometric: str,
                     frame_time_ms: float = 33.3, transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    """B-mode ultrasound, one frame (N=1) or a cine loop, from (N, H, W) 8-bit grey.

    ``photometric``: MONOCHROME2 (grey), RGB or YBR_FULL (colour through the ``US_TINT`` display map,
    as many scanners store even grey B-mode images). Multi-frame files use Ultrasound Multi-frame
    Image Storage with a frame time.
    """
    frames = grey.shape[0]
    sop = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    ds = _dataset(sop, ident, "US", instance, "phantom abdomen B-mode" + (" cine" if frames > 1 else ""))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.BodyPartExamined = "ABDOMEN"
    if frames > 1:
        ds.FrameTime = frame_time_ms
        ds.FrameIncrementPointer = 0x00181063  # (0018,1063) Frame Time
    pixels = grey if frames > 1 else grey[0]
    if photometric != "MONOCHROME2":
        pixels = np.clip(np.rint(pixels[..., None] * US_TINT), 0, 255).astype(np.uint8)
        if photometric == "YBR_FULL":
            pixels = convert_color_space(pixels, "RGB", "YBR_FULL", per_frame=frames > 1)
    _save(ds, path, np.ascontiguousarray(pixels, dtype=np.uint8), photometric, 8, transfer_syntax)


def write_nifti(path: Path, volume: np.ndarray, spacing_mm: tuple[float, float, float], z0_mm: float) -> None:
    """An axial stack (slices, rows, columns; slices inferior to superior) as a NIfTI-1 volume, int16.

    NIfTI's first voxel axis runs along the columns (toward the patient's left: -x in RAS), the second
    along the rows (toward posterior: -y), the third along the slices (toward the head: +z); the
    affine says so, so a reader that reorients to RAS gets the same axial images back.
    """
    dz, dy, dx = spacing_mm
    n, rows, cols = volume.shape
    affine = np.array([[-dx, 0, 0, (cols - 1) / 2 * dx],
                       [0, -dy, 0, (rows - 1) / 2 * dy],
                       [0, 0, dz, z0_mm],
                       [0, 0, 0, 1]])
    data = np.clip(np.rint(volume), -32768, 32767).astype(np.int16).transpose(2, 1, 0)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
