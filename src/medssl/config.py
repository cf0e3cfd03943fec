"""Typed configuration: YAML files plus ``--set key=value`` overrides, validated with clear errors.

Every command has one pydantic model. Values are resolved in this order (later wins):
model defaults < ``--config FILE.yaml`` < command-line flags < ``--set key=value``.
Unknown keys are errors, so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Plane = Literal["axial", "coronal", "sagittal"]


class IngestConfig(StrictModel):
    """Settings of ``medssl ingest`` (see README, section "Ingest")."""

    inputs: list[Path] = Field(default_factory=list, description="folders or files to ingest")
    out: Path | None = Field(default=None, description="output folder (shards, manifest, report)")
    workers: int = Field(default=2, ge=1, description="local worker processes")
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(default=None, description="Ray cluster address; None starts a local Ray")
    files_per_chunk: int = Field(default=64, ge=1, description="input files per work unit (one unit writes its own shards)")
    samples_per_shard: int = Field(default=1000, ge=1, description="a work unit starts a new shard after this many samples")
    max_side: int = Field(default=512, ge=8, description="resize so that the longer side is at most this")
    planes: list[Plane] = Field(default_factory=lambda: ["axial"], description="planes sliced from 3D volumes")
    slice_stride: int = Field(default=1, ge=1, description="keep every n-th slice of a volume / frame of a multi-frame file")
    max_pixels: int = Field(default=1_000_000_000, ge=1, description="reject files with more voxels (decompression bombs)")
    max_frame_side: int = Field(default=32768, ge=1, description="reject images with a side longer than this")
    percentiles: tuple[float, float] = Field(default=(0.5, 99.5), description="robust range mapped to [0, 1] for MR and images without a defined intensity scale")
    nifti_modality: str = Field(default="auto", description="modality of NIfTI files: auto (CT if values look like HU, else MR) or a DICOM modality code")
    raster_modality: str = Field(default="OT", description="modality recorded for PNG/JPEG/TIFF files, which carry none")
    redact_paths: bool = Field(default=False, description="write salted path hashes instead of paths into manifest, report and logs")
    salt_file: Path | None = Field(default=None, description="secret salt for identifier hashes (default ~/.medssl/salt)")
    strict: bool = Field(default=False, description="exit non-zero if any file is rejected")

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got {v}")
        return v

    @field_validator("nifti_modality", "raster_modality")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v if v == "auto" else v.upper()


M = TypeVar("M", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3). Values are parsed as YAML scalars/lists, so ``[1, 2]`` is a list."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _set_nested(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_config(model: type[M], file: Path | None = None, flags: dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> M:
    """Build ``model`` from a YAML file, command-line flags (None = not given) and ``--set`` overrides."""
    tree: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(Path(file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must contain a mapping of settings, got {type(loaded).__name__}")
        tree.update(loaded or {})
    for k, v in (flags or {}).items():
        if v is not None:
            tree[k] = v
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_nested(tree, keys, value)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(config)"
            lines.append(f"  {where}: {err['msg']}" + (f" (got {err['input']!r})" if err["type"] != "missing" else ""))
        source = f" in {file}" if file else ""
        raise ConfigError(f"invalid {model.__name__}{source}:\n" + "\n".join(lines)) from None


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """JSON-friendly dict of a config (paths as strings), for run records and model cards."""
    return cfg.model_dump(mode="json")
