"""Typed configuration: YAML files plus ``--set key=value`` overrides, validated with clear errors.

Every command has one pydantic model. Values are resolved in this order (later wins):
model defaults < ``--config FILE.yaml`` < command-line flags < ``--set key=value``.
Unknown keys are errors, so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from medssl.storage import location


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Plane = Literal["axial", "coronal", "sagittal"]
# A local folder (Path) or an object-storage URL (str: pathlib would fold its "//"); see medssl.storage.
Location = Annotated[Path | str, BeforeValidator(location)]


class IngestConfig(StrictModel):
    """Settings of ``medssl ingest`` (see README, section "Ingest")."""

    inputs: list[Location] = Field(default_factory=list, description="folders or files to ingest, local or s3://...")
    out: Location | None = Field(
        default=None, description="output folder (shards, manifest, report), local or s3://...")
    workers: int = Field(default=2, ge=1, description="local worker processes")
    engine: Literal["local", "ray"] = Field(
        default="local", description="local: a process pool of `workers`; ray: Ray tasks on a cluster (ray_address)")
    ray_address: str | None = Field(default=None, description="Ray cluster address; None starts a local Ray")
    files_per_chunk: int = Field(
        default=256, ge=1,
        description="input files per work unit (one unit writes its own shards; larger units give larger shards)")
    samples_per_shard: int = Field(
        default=1000, ge=1, description="a work unit starts a new shard after this many samples")
    mix_units: int = Field(
        default=256, ge=1,
        description="the listing is dealt round-robin to blocks of this many work units, so that one series' slices "
                    "land in many shards and batches mix series (1: each unit takes consecutive files)")
    max_side: int = Field(default=512, ge=8, description="resize so that the longer side is at most this")
    pixel_format: Literal["u16-planes-zstd", "png16"] = Field(
        default="u16-planes-zstd",
        description="how shards store pixels: u16-planes-zstd (uint16 byte planes + zstd, ~9x faster to decode) or "
                    "png16 (16-bit PNG, opens in any image tool); readers take both")
    planes: list[Plane] = Field(default_factory=lambda: ["axial"], description="planes sliced from 3D volumes")
    slice_stride: int = Field(
        default=1, ge=1, description="keep every n-th slice of a volume / frame of a multi-frame file")
    max_pixels: int = Field(
        default=1_000_000_000, ge=1, description="reject files with more voxels (decompression bombs)")
    max_frame_side: int = Field(default=32768, ge=1, description="reject images with a side longer than this")
    max_memory_mb: int = Field(
        default=4096, ge=64,
        description="memory budget of one decode worker: a file whose header needs more is rejected (too_large) before "
                    "decoding, and the worker is capped at it")
    file_timeout_s: float = Field(
        default=300.0, gt=0,
        description="seconds one file may take to read; then its decode worker is stopped and the file rejected "
                    "(timeout)")
    percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5),
        description="robust range mapped to [0, 1] for MR and images without a defined intensity scale")
    nifti_modality: str = Field(
        default="auto",
        description="modality of NIfTI files: auto (CT if values look like HU, else MR) or a DICOM modality code")
    raster_modality: str = Field(
        default="OT", description="modality recorded for PNG/JPEG/TIFF files, which carry none")
    redact_paths: bool = Field(
        default=False, description="write salted path hashes instead of paths into manifest, report and logs")
    salt_file: Path | None = Field(
        default=None, description="secret salt for identifier hashes (default ~/.medssl/salt)")
    strict: bool = Field(
        default=False,
        description="exit non-zero if any file is rejected (files left out by modalities, exclude_modalities or "
                    "non_image_objects do not count)")
    modalities: list[str] | None = Field(
        default=None, description="ingest only these modality codes, e.g. [CT, MR] (None: all); others get the "
                                  "reason excluded_modality")
    exclude_modalities: list[str] = Field(
        default_factory=list, description="leave out these modality codes, e.g. [US] (reason excluded_modality)")
    non_image_objects: bool = Field(
        default=False,
        description="also ingest DICOM objects that hold pixel data but no picture of the patient: segmentations "
                    "(SEG), dose grids (RTDOSE), structure sets, plans, presentation states, key objects, reports "
                    "(off: reason non_image_object)")
    lease_ttl_s: float = Field(
        default=120.0, gt=0,
        description="object-storage datasets: a writer's lease not renewed for this long is taken to belong to a "
                    "run that died and is taken over (local folders use a lock the system frees itself)")

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

    @field_validator("modalities", "exclude_modalities")
    @classmethod
    def _codes(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [code.strip().upper() for code in v]


# (level, width) in HU of common display windows.
DEFAULT_CT_WINDOWS = [
    (40.0, 400.0),     # soft tissue (abdomen)
    (40.0, 80.0),      # brain
    (50.0, 350.0),     # mediastinum
    (500.0, 2000.0),   # bone
    (-600.0, 1500.0),  # lung
]


class MultiCropConfig(StrictModel):
    """Crops and augmentation strengths. Ranges are (min, max); a range (v, v) fixes the value."""

    n_global: int = Field(default=2, ge=1, description="global crops (codes are computed on these)")
    global_size: int = Field(default=224, ge=8, description="side of a global crop in pixels")
    global_scale: tuple[float, float] = Field(
        default=(0.25, 1.0), description="area of a global crop's box, fraction of the image")
    n_local: int = Field(default=6, ge=0, description="local crops")
    local_size: int = Field(default=96, ge=8, description="side of a local crop in pixels")
    local_scale: tuple[float, float] = Field(
        default=(0.05, 0.25), description="area of a local crop's box, fraction of the image")
    aspect_ratio: tuple[float, float] = Field(
        default=(3 / 4, 4 / 3), description="width/height of a crop's box (log-uniform)")
    rotation: tuple[float, float] = Field(default=(-15.0, 15.0), description="rotation in degrees (uniform)")
    scale_jitter: tuple[float, float] = Field(
        default=(0.9, 1.1),
        description="zoom of the box (log-uniform); > 1 shows more, outside the image filled with its minimum")
    hflip_prob: float = Field(default=0.5, ge=0, le=1)
    vflip_prob: float = Field(default=0.0, ge=0, le=1, description="off by default: anatomy has an up and down")
    ct_windows: list[tuple[float, float]] = Field(
        default_factory=lambda: list(DEFAULT_CT_WINDOWS), min_length=1,
        description="(level, width) in HU; one is picked per crop")
    ct_window_jitter: float = Field(
        default=0.2, ge=0,
        description="level moves by up to this fraction of the width; width scales by up to exp(+-this)")
    gamma_prob: float = Field(default=0.5, ge=0, le=1)
    gamma: tuple[float, float] = Field(default=(0.7, 1.5), description="gamma exponent (log-uniform)")
    contrast: float = Field(default=0.3, ge=0, lt=1, description="contrast factor in 1 +- this, about the crop's mean")
    brightness: float = Field(default=0.1, ge=0, description="added offset in +- this")
    blur_prob: float = Field(default=0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = Field(default=(0.1, 1.5), description="Gaussian blur sigma in output pixels")
    noise_prob: float = Field(default=0.3, ge=0, le=1)
    noise_std: tuple[float, float] = Field(default=(0.0, 0.03), description="std of added Gaussian noise")

    @model_validator(mode="after")
    def _ranges(self) -> MultiCropConfig:
        positive = ("global_scale", "local_scale", "aspect_ratio", "scale_jitter", "gamma", "blur_sigma")
        for name in (*positive, "rotation", "noise_std"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: need min <= max, got ({lo}, {hi})")
            if name in positive and lo <= 0:
                raise ValueError(f"{name}: values must be > 0, got ({lo}, {hi})")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name}: a box cannot be larger than the image, got max {getattr(self, name)[1]}")
        if any(width <= 0 for _, width in self.ct_windows):
            raise ValueError(f"ct_windows: widths must be > 0, got {self.ct_windows}")
        return self

    @classmethod
    def preset(cls, name: str) -> MultiCropConfig:
        """``swav``: 2x224 + 6x96 as in SwAV; ``cpu``: 2x96 + 4x48 for CPU-scale runs."""
        if name not in PRESETS:
            raise ValueError(f"unknown multi-crop preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "swav": dict(n_global=2, global_size=224, n_local=6, local_size=96),
    "cpu": dict(n_global=2, global_size=96, n_local=4, local_size=48),
}


# How fine-tuning makes an image square (downstream.decode.fit_square).
ResizeMode = Literal["pad", "stretch", "crop"]


class _CropOverrides(StrictModel):
    """Some fields of ``MultiCropConfig`` over a base (a preset, the fine-tuning views): each field is its
    type or unset. Unknown names are refused when the config is loaded; the combined settings are checked by
    ``MultiCropConfig`` (``ranges``, bounds) when the config is, too. Records hold the set fields only."""

    @model_serializer(mode="wrap")
    def _set_only(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def over(self, base: dict[str, Any]) -> MultiCropConfig:
        return MultiCropConfig.model_validate({**base, **self.model_dump()})


# One field per MultiCropConfig field, of its type or None: the two cannot drift apart.
CropOverrides = create_model(
    "CropOverrides", __base__=_CropOverrides, __doc__=_CropOverrides.__doc__,
    **{name: (f.annotation | None, Field(default=None, description=f.description))
       for name, f in MultiCropConfig.model_fields.items()})


class PretrainConfig(StrictModel):
    """Settings of ``medssl pretrain`` (see README, section "Pretrain")."""

    shards: list[Location] = Field(
        default_factory=list, description="ingest output folders, local or s3://... (several are combined)")
    out: Location | None = Field(
        default=None, description="run folder, local or s3://...: checkpoints, encoder, metrics")
    # model
    backbone: str = Field(
        default="resnet18", description="timm backbone: resnet18, resnet50, densenet121, vit_small_patch16_224, ...")
    init: str | None = Field(
        default=None,
        description="continue from weights instead of random ones: a weights file of `backbone` (.safetensors, or a "
                    "PyTorch state dict .pt/.pth/.bin, read without unpickling; a 3-channel first layer is summed to 1 "
                    "channel) or a medssl run folder; used at the start of a run, not on resume")
    proj_hidden: int = Field(default=2048, ge=1, description="hidden width of the projection head (MLP)")
    proj_dim: int = Field(default=128, ge=1, description="dimension of the projected, L2-normalised features")
    n_prototypes: int = Field(default=3000, ge=2, description="SwAV prototypes (clusters) the codes are assigned to")
    # views
    crops: Literal["cpu", "swav"] = Field(
        default="cpu", description="multi-crop preset: cpu = 2x96 + 4x48, swav = 2x224 + 6x96")
    augment: CropOverrides = Field(
        default_factory=CropOverrides, description="overrides of the preset (fields of MultiCropConfig)")
    crops_on: Literal["loader", "device"] = Field(
        default="loader",
        description="where the views are made: loader = per image in the DataLoader workers (fastest when training on "
                    "CPU); device = batched on the training device before the forward, the workers only read and "
                    "decode (pick it for GPU training)")
    # objective: w_cluster * L_swav + w_contrast * L_infonce
    w_cluster: float = Field(default=1.0, ge=0, description="weight of the SwAV swapped-prediction term")
    w_contrast: float = Field(default=1.0, ge=0, description="weight of the InfoNCE instance-contrastive term")
    temperature: float = Field(default=0.1, gt=0, description="SwAV softmax temperature")
    nce_temperature: float = Field(default=0.1, gt=0, description="InfoNCE softmax temperature")
    sinkhorn_epsilon: float = Field(default=0.05, gt=0, description="Sinkhorn-Knopp entropy regularisation")
    sinkhorn_iterations: int = Field(default=3, ge=1, description="Sinkhorn-Knopp iterations per batch")
    queue_length: int = Field(
        default=0, ge=0, description="feature queue length over all ranks, a multiple of their number (0: none)")
    freeze_prototypes_steps: int = Field(
        default=100, ge=0,
        description="prototypes get no update for these first steps (SwAV: lets the codes settle; below max_steps)")
    # optimisation
    batch_size: int = Field(default=64, ge=1, description="per process")
    epochs: int = Field(default=10, ge=1, description="passes over the shards (when max_steps is not set)")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps (default: epochs)")
    optimizer: Literal["lars", "sgd", "adamw"] = Field(default="lars", description="LARS (SwAV's) for large batches")
    lr: float = Field(default=0.6, gt=0, description="learning rate for a global batch of 256 (scaled linearly)")
    final_lr: float = Field(default=0.0006, ge=0, description="end of the cosine decay, for a global batch of 256")
    warmup_steps: int = Field(
        default=50, ge=0, description="linear learning-rate warm-up, then cosine decay (below max_steps)")
    weight_decay: float = Field(default=1e-6, ge=0, description="L2 weight decay")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD / LARS momentum")
    grad_clip: float | None = Field(default=3.0, gt=0, description="max gradient norm (None: no clipping)")
    max_bad_steps: int = Field(default=5, ge=1, description="stop after this many consecutive non-finite losses")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="auto: bf16 autocast where the hardware has bf16 (GPUs that support it, CPUs with AVX512-BF16 or "
                    "AMX), fp32 elsewhere")
    channels_last: bool = Field(default=True, description="NHWC memory layout (faster convolutions)")
    # data and bookkeeping
    workers: int = Field(default=2, ge=0, description="DataLoader worker processes per training process")
    shuffle_buffer: int = Field(default=1000, ge=1, description="samples each loader worker shuffles among")
    checkpoint_every: int = Field(default=500, ge=1, description="steps between checkpoints")
    snapshot_every: int | None = Field(
        default=None, ge=1,
        description="also keep the encoder every this many steps in snapshots/step-NNNNNN/ (each a run folder that "
                    "--init and `medssl probe` take), to see how pretraining length pays off")
    log_every: int = Field(default=10, ge=1, description="steps between lines of metrics.jsonl")
    seed: int = Field(default=0, ge=0, description="seed of initialisation, shard order and augmentation")
    deterministic: bool = Field(default=False, description="deterministic kernels (exact resume, slower)")
    device: str = Field(default="auto", description="auto, cpu or cuda")

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.w_cluster + self.w_contrast == 0:
            raise ValueError("w_cluster and w_contrast cannot both be 0")
        if self.queue_length and self.w_cluster == 0:
            raise ValueError(f"queue_length {self.queue_length}: the feature queue only serves the SwAV term, but "
                             "w_cluster is 0; set queue_length to 0 or w_cluster above 0")
        # A short run on the defaults would be all warm-up with frozen prototypes (max_steps=30: the learning
        # rate peaked at 0.0218 of 0.0375). Values the user set are theirs; defaults that do not fit are refused.
        short = [f"the default {name}={getattr(self, name)} ({why})" for name, why in (
            ("warmup_steps", "the learning rate would never reach its peak"),
            ("freeze_prototypes_steps", "the prototypes would never be trained"))
            if self.max_steps is not None and name not in self.model_fields_set
            and getattr(self, name) >= self.max_steps]
        if short:
            raise ValueError(f"max_steps={self.max_steps} ends before " + " and ".join(short) + ": set them below "
                             f"it, e.g. --set warmup_steps={self.max_steps // 10} --set freeze_prototypes_steps="
                             f"{self.max_steps // 5}")
        self.multicrop()  # validates the augment overrides now, not at the first batch
        return self

    def multicrop(self):

        return self.augment.over(MultiCropConfig.preset(self.crops).model_dump())


def _validate_nested(model: type[BaseModel], settings: dict[str, Any]) -> None:
    """Validate a dict of settings meant for another config, as one readable ValueError."""
    try:
        model.model_validate(settings)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise ValueError("; ".join(problems)) from None


def settings_of(model: type[BaseModel]) -> Any:
    """The type of a dict of settings meant for ``model`` (e.g. a bench's pretrain settings), checked
    against ``model`` when the holding config is validated: a typo fails now, not an hour later."""
    def check(v: dict[str, Any]) -> dict[str, Any]:
        _validate_nested(model, v)
        return v

    return Annotated[dict[str, Any], AfterValidator(check)]


def _positive_width(v: tuple[float, float]) -> tuple[float, float]:
    if v[1] <= 0:
        raise ValueError(f"need [level, width] with width > 0, got {list(v)}")
    return v


# A CT display window: (level, width) in HU.
CtWindow = Annotated[tuple[float, float], AfterValidator(_positive_width)]


# Hybrid fine-tuning's default weight of the self-supervised term (relative, ssl_scale "start"); chosen on
# validation AUC, see BENCHMARKS.md "The hybrid regime".
HYBRID_SSL_WEIGHT = 0.1


class FinetuneConfig(StrictModel):
    """Settings of ``medssl finetune`` (see README, section "Downstream")."""

    task: Path | None = Field(default=None, description="task CSV: path,label[,split][,group]")
    init: str = Field(
        default="scratch",
        description="a `medssl pretrain` run folder, a weights file of `backbone` (.safetensors, or a PyTorch state "
                    "dict .pt/.pth/.bin, read without unpickling), or scratch (random weights)")
    mode: Literal["knn", "linear", "finetune", "hybrid"] = Field(
        default="finetune",
        description="knn: frozen encoder, weighted votes of the k nearest labeled images; linear: frozen encoder + "
                    "linear head (probe_lrs swept on validation); finetune: train everything; hybrid: finetune + "
                    "ssl_weight x self-supervised loss on all training images")
    label_fraction: float = Field(
        default=1.0, gt=0, le=1, description="fraction of the labeled training images used (stratified, seeded)")
    seed: int = Field(default=0, ge=0, description="seed of initialisation, label subset, batch order and augmentation")
    out: Path | None = Field(default=None, description="output folder: metrics.json, best.pt, test_predictions.csv")
    # the task and its images
    task_type: Literal["auto", "binary", "multiclass", "multilabel"] = Field(
        default="auto", description="auto: multilabel if a label holds '|', else binary (2 classes) or multiclass")
    positive_class: str | None = Field(
        default=None, description="binary tasks: the positive class (default: the second in sorted order)")
    input_size: int = Field(
        default=224, ge=8, description="images are resized to input_size x input_size (see resize)")
    resize: ResizeMode = Field(
        default="pad",
        description="how an image becomes a square: pad = aspect kept, the longer side fits, padded; stretch = both "
                    "sides fit, aspect changed; crop = aspect kept, the shorter side fits, the centre kept")
    ct_window: CtWindow = Field(
        default=(40.0, 400.0),
        description="(level, width) in HU through which CT images reach the encoder; default soft tissue, e.g. [40, "
                    "80] for brain")
    percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5),
        description="robust range mapped to [0, 1] for MR and images without a defined intensity scale (as in ingest)")
    nifti_modality: str = Field(default="auto", description="modality of NIfTI files (as in ingest)")
    raster_modality: str = Field(default="OT", description="modality of PNG/JPEG/TIFF files (as in ingest)")
    val_fraction: float = Field(
        default=0.15, gt=0, lt=1,
        description="share of the training images carved out for validation when the CSV has no val split")
    test_fraction: float = Field(
        default=0.15, gt=0, lt=1,
        description="share of the training images carved out for testing when the CSV has no test split")
    split_seed: int = Field(
        default=0, ge=0,
        description="seed of the carve-out; separate from seed so that every run of a comparison shares one test set")
    skip_bad: bool = Field(
        default=False, description="drop missing or unreadable images (listed in metrics.json) instead of stopping")
    paths_outside_csv: bool = Field(
        default=False,
        description="allow task CSV paths that lead outside the CSV's folder (absolute, or climbing out with ..); "
                    "off so that a CSV from elsewhere cannot make medssl open any file of the machine")
    max_memory_mb: int = Field(
        default=4096, ge=64,
        description="memory budget of the image decode worker (as in ingest): larger images are rejected (too_large)")
    file_timeout_s: float = Field(
        default=300.0, gt=0,
        description="seconds one image may take to decode (as in ingest); then it is rejected (timeout)")
    # model
    backbone: str = Field(
        default="resnet18",
        description="timm backbone for --init scratch or a weights file (a run folder brings its own)")
    scratch_ssl: settings_of(PretrainConfig) = Field(
        default_factory=dict,
        description="scratch + hybrid: pretrain settings (proj_dim, n_prototypes, w_contrast, crops, ...) for the "
                    "fresh heads, loss and views; default pretrain's defaults")
    # optimisation
    epochs: int = Field(default=20, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps (default: epochs)")
    batch_size: int = Field(default=32, ge=2, description="labeled images per step")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(
        default=1e-4, gt=0, description="learning rate of the encoder (and, in hybrid mode, of the SSL heads)")
    head_lr: float = Field(default=1e-3, gt=0, description="learning rate of the new classification head")
    probe_lrs: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1],
        description="linear mode: head learning rates tried, the best on validation kept ([]: head_lr alone)")
    knn_k: int = Field(default=20, ge=1, description="knn mode: neighbours that vote (at most the labeled images)")
    knn_temperature: float = Field(
        default=0.07, gt=0, description="knn mode: votes weigh exp(cosine similarity / this), as in DINO")
    layer_decay: float | None = Field(
        default=None, gt=0, le=1,
        description="layer-wise lr decay of the encoder, e.g. 0.75: each block down gets this factor (None: off)")
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up, then cosine decay to 0")
    patience: int | None = Field(
        default=None, ge=1, description="early stopping: stop after this many epochs without a better validation AUC")
    train_augment: bool = Field(
        default=True,
        description="random crop/rotation/flip/intensity changes of the labeled images (not in linear mode)")
    augment: CropOverrides = Field(
        default_factory=CropOverrides,
        description="overrides of the fine-tuning augmentation (fields of MultiCropConfig)")
    # hybrid regime
    ssl_weight: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        default=HYBRID_SSL_WEIGHT,
        description="hybrid: weight of the self-supervised term relative to the supervised loss (see ssl_scale); auto: "
                    "each of ssl_weight_grid is trained, the best on validation kept")
    ssl_weight_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.1, 0.3, 1.0], min_length=1, description="hybrid, ssl_weight auto: the weights tried")
    ssl_scale: Literal["start", "none"] = Field(
        default="start",
        description="hybrid: start: the self-supervised loss is scaled by (supervised / self-supervised loss) at the "
                    "first step, so that ssl_weight 1 starts both terms equal whatever their units; none: raw")
    ssl_batch_size: int = Field(
        default=16, ge=2, description="hybrid: images (labeled and unlabeled) per step for the self-supervised loss")
    ssl_augment: CropOverrides = Field(
        default_factory=CropOverrides,
        description="hybrid: overrides of the multi-crop views (default: the pretraining run's views)")
    # evaluation and convergence
    target_auc: float | None = Field(
        default=None, gt=0, le=1, description="report the first step whose validation AUC reaches this")
    target_from: Path | None = Field(
        default=None, description="take target_auc from another finetune output folder: its best validation AUC")
    bootstrap: int = Field(default=1000, ge=10, description="bootstrap resamples of the test AUC's 95% interval")
    eval_batch_size: int = Field(default=64, ge=1)
    device: str = Field(default="auto", description="auto, cpu or cuda")

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        return IngestConfig._ordered(v)

    @field_validator("nifti_modality", "raster_modality")
    @classmethod
    def _upper(cls, v: str) -> str:
        return IngestConfig._upper(v)

    @field_validator("init", mode="before")
    @classmethod
    def _init_path(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v  # Python callers pass run folders as Path objects

    @field_validator("task", "target_from")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        # Recorded in metrics.json and best.pt: `medssl evaluate` must find the task from any working folder.
        return v.absolute() if v is not None else None

    @field_validator("augment", "ssl_augment")
    @classmethod
    def _crop_overrides(cls, v: CropOverrides) -> CropOverrides:
        _validate_nested(MultiCropConfig, v.model_dump())  # now rather than at the first batch
        return v

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.target_auc is not None and self.target_from is not None:
            raise ValueError("give target_auc or target_from, not both")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction leaves (almost) no training images: "
                             f"{self.val_fraction} + {self.test_fraction}")
        return self

    def finetune_augment(self):
        """Augmentation of the labeled images: one view, milder than pretraining, CT through ``ct_window``."""

        base = dict(n_global=1, n_local=0, global_size=self.input_size, global_scale=(0.7, 1.0),
                    rotation=(-10.0, 10.0), ct_windows=[self.ct_window], ct_window_jitter=0.05,
                    gamma_prob=0.3, gamma=(0.8, 1.25), contrast=0.1, brightness=0.05,
                    blur_prob=0.1, blur_sigma=(0.1, 1.0), noise_prob=0.1, noise_std=(0.0, 0.02))
        return self.augment.over(base)

    def scratch_pretrain_config(self) -> PretrainConfig:
        """The pretraining settings that shape fresh SSL heads, loss and views (hybrid from scratch)."""
        return PretrainConfig.model_validate({**self.scratch_ssl, "backbone": self.backbone})


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


class CurateConfig(StrictModel):
    """Settings of ``medssl curate`` (see README, section "Curate")."""

    shards: list[Location] = Field(
        default_factory=list, description="ingest output folders to curate, local or s3://...")
    out: Path | None = Field(
        default=None,
        description="output folder: a new dataset of the kept samples, its manifest, drops.jsonl and report")
    threshold: int = Field(
        default=4, ge=0, le=11,
        description="two images whose 64-bit perceptual hashes differ in at most this many bits are near-identical: "
                    "the later one is dropped (0: identical hashes only)")
    ct_window: CtWindow = Field(
        default=(40.0, 400.0), description="(level, width) in HU through which CT is hashed (as displayed)")


class BenchTask(StrictModel):
    """One labeled task of a bench."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder name of the task's runs")
    csv: Path = Field(description="task CSV (paths in it are relative to its folder)")
    relabel: dict[str, str] = Field(
        default_factory=dict,
        description="class -> new class, e.g. to merge tumour types into one 'tumour' class for a binary view")
    settings: settings_of(FinetuneConfig) = Field(
        default_factory=dict, description="FinetuneConfig settings for this task only, e.g. ct_window")


class BenchArm(StrictModel):
    """One way of training a task's classifier: where the encoder starts and how it is trained."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    init: str = Field(
        description="scratch: random weights; ssl: the bench's pretraining run; or a path: a weights file or another "
                    "run folder (an encoder to compare with)")
    mode: Literal["knn", "linear", "finetune", "hybrid"]
    settings: settings_of(FinetuneConfig) = Field(
        default_factory=dict,
        description="FinetuneConfig settings for this arm only, e.g. ssl_weight: 0.1 (win over the task's)")


def _default_arms() -> list[BenchArm]:
    return [BenchArm(name="scratch-finetune", init="scratch", mode="finetune"),
            BenchArm(name="ssl-finetune", init="ssl", mode="finetune"),
            BenchArm(name="ssl-hybrid", init="ssl", mode="hybrid")]


class BenchConfig(StrictModel):
    """Settings of ``medssl bench`` (see README, section "Bench")."""

    out: Path | None = Field(
        default=None, description="bench folder: tasks, pool shards, pretraining run, runs, results")
    tasks: list[BenchTask] = Field(default_factory=list, description="labeled tasks")
    unlabeled: list[Path] = Field(
        default_factory=list,
        description="extra folders/files for the pretraining pool (their copies of any task's val/test images are left "
                    "out)")
    ingest: settings_of(IngestConfig) = Field(
        default_factory=dict, description="IngestConfig settings for the pretraining pool")
    pretrain: settings_of(PretrainConfig) = Field(
        default_factory=dict, description="PretrainConfig settings of the pretraining run")
    curate: settings_of(CurateConfig) | None = Field(
        default=None,
        description="CurateConfig settings (threshold, ct_window): drop near-duplicate slices of the pool before "
                    "pretraining (none: pretrain on every pooled slice)")
    finetune: settings_of(FinetuneConfig) = Field(
        default_factory=dict, description="FinetuneConfig settings of every downstream run")
    arms: list[BenchArm] = Field(default_factory=_default_arms, min_length=1)
    label_fractions: list[float] = Field(default_factory=lambda: [0.1, 1.0], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    robustness_fractions: list[float] = Field(
        default_factory=lambda: [1.0], description="label fractions whose runs get the robustness sweep ([] for none)")
    robustness_levels: dict[str, list[float]] = Field(
        default_factory=dict, description="sweep -> levels, overriding the defaults")
    workers: int = Field(default=2, ge=1, description="downstream runs in parallel, one process each")
    threads_per_worker: int = Field(
        default=1, ge=1, description="torch threads of each run process (workers x threads <= cores)")

    @field_validator("label_fractions", "robustness_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"label fractions are in (0, 1], got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if not self.tasks:
            raise ValueError("no tasks: a bench needs at least one entry under tasks (name, csv)")
        for kind, names in (("task", [t.name for t in self.tasks]), ("arm", [a.name for a in self.arms])):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        for arm in self.arms:
            if arm.init not in ("scratch", "ssl") and not Path(arm.init).exists():
                raise ValueError(f"arms.{arm.name}.init: {arm.init} is neither scratch, ssl nor an existing weights "
                                 "file or run folder")
        if not any(a.init == "scratch" for a in self.arms):
            raise ValueError("a bench compares against training from scratch: add an arm with init: scratch")
        reserved = {"task", "init", "mode", "label_fraction", "seed", "out", "target_auc", "target_from"}
        for where, settings in ([("finetune", self.finetune)]
                                + [(f"tasks.{t.name}.settings", t.settings) for t in self.tasks]
                                + [(f"arms.{a.name}.settings", a.settings) for a in self.arms]):
            clash = sorted(reserved & set(settings))
            if clash:
                raise ValueError(f"{where}: {', '.join(clash)} are set by the bench itself")
        return self
