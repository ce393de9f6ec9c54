"""The run configuration: YAML and flags parsed once into frozen, validated dataclasses.

Precedence is defaults < YAML files (in the order given) < command-line flags. Unknown keys are
rejected with their full key path, and every value is checked on load, so a typo fails in the
first second of an overnight run rather than at 3 am. Only :mod:`pipeline.run` and :mod:`pipeline.cli`
see the whole config; the other modules take the few plain values they need. How values are read
and checked is :mod:`pipeline.parse`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import remote
from pipeline.errors import ConfigError, option
from pipeline.parse import merge, parse_dataclass, parse_int, parse_number, read_yaml
from pipeline.presets import config_file

OutputDtype = Literal["float32", "float16", "uint8"]
OutputFormat = Literal["ome-zarr-0.4", "ome-zarr-0.5"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["float32", "float16", "bfloat16"]
Tta = Literal["none", "flips"]
BlendMode = Literal["none", "gaussian", "cosine"]
MaskKind = Literal["auto", "none", "image"]


def _positive(value: int | None, key: str, most: int = 2**20) -> None:
    """Every size is bounded: a mistyped 100000000000000000000 fails here, not after hours."""
    if value is not None:
        parse_int(value, key, minimum=1, maximum=most)


def _non_negative(value: int, key: str, most: int = 2**20) -> None:
    parse_int(value, key, minimum=0, maximum=most)


MAX_TILE = 8192
"""Largest tile side: a 8192 x 8192 tile of 16 float32 classes is 4 GiB of probabilities alone."""


def _finite_positive(value: float | None, key: str) -> None:
    if value is not None:
        parse_number(value, key, positive=True)


@dataclass(frozen=True)
class InputConfig:
    path: str | None = None
    """The TIFF to read."""
    series: int = 0
    """Which image series of the file (``fcnpipe inspect`` lists them)."""
    level: int | None = None
    """Pyramid level read as it is (0 = full resolution). None: level 0, or the level the model's
    resolution asks for."""
    mpp: float | None = None
    """Micrometres per pixel to read a slide at; None: the checkpoint's training resolution."""
    gsd: float | None = None
    """CRS units per pixel to read a raster at; None: the checkpoint's training resolution."""
    resolution_tolerance: float = 0.02
    """A level within this fraction of the resolution asked for is read as it is, not resampled
    (a 0.499 µm/px scan for a 0.5 µm/px model): resampling by 0.2% would blur every pixel and lose
    the pixel grid of the slide, for a difference no network sees. The output records the level's
    true scale. 0: always resample to the exact resolution."""
    window: tuple[int, int, int, int] | None = None
    """Run only ``(col_off, row_off, width, height)`` (gdal's ``-srcwin``), in pixels of the grid read."""
    bbox: tuple[float, float, float, float] | None = None
    """Run only ``(min_x, min_y, max_x, max_y)``: CRS units (rasters) or µm from the top-left (slides)."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for an input URL (``s3://``, ``https://``), e.g. ``{endpoint_url: ..., anon: true}``
    or ``{profile: lab}``; None: the standard AWS environment. They may hold credentials, so the
    store records only their names, never their values."""

    def __post_init__(self) -> None:
        _non_negative(self.series, "input.series", 100_000)
        if self.window is not None and (min(self.window[:2]) < 0 or min(self.window[2:]) < 1):
            raise ConfigError(f"Expected col_off row_off >= 0, width height >= 1 for 'input.window'. Got {self.window}")
        if self.bbox is not None and not (self.bbox[0] < self.bbox[2] and self.bbox[1] < self.bbox[3]):
            raise ConfigError(f"Expected min_x min_y max_x max_y, mins below maxes, for 'input.bbox'. Got {self.bbox}")
        if self.window is not None and self.bbox is not None:
            raise ConfigError("Give input.window or input.bbox, not both: they choose the same thing")
        if not 0 <= self.resolution_tolerance < 0.5:
            raise ConfigError(
                "Expected a fraction in [0, 0.5) for 'input.resolution_tolerance'. "
                f"Got {self.resolution_tolerance} instead."
            )
        if self.level is not None:
            _non_negative(self.level, "input.level", 100)
        for key, value in (("input.mpp", self.mpp), ("input.gsd", self.gsd)):
            _finite_positive(value, key)
        if self.level is not None and (self.mpp is not None or self.gsd is not None):
            raise ConfigError("Give input.level or input.mpp / input.gsd, not both: a level is read as it is")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """An fcnpipe checkpoint, a TorchScript file, or a ``state_dict`` (of the reference FCN, or of
    the module ``factory`` builds)."""
    factory: str | None = None
    """``"package.module:function"`` returning the module whose ``state_dict`` ``path`` holds."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean subtracted after scaling to [0, 1]; overrides the checkpoint's."""
    std: tuple[float, ...] | None = None
    """Per-channel standard deviation divided by after the mean; overrides the checkpoint's."""
    class_names: tuple[str, ...] | None = None
    """Names of the classes, in output channel order; overrides the checkpoint's."""
    class_colors: tuple[str, ...] | None = None
    """Colours of the classes as ``"#RRGGBB"``, in the same order; overrides the checkpoint's."""
    tta: Tta = "none"
    """Test-time augmentation: ``flips`` averages the predictions of the 4 flips of each tile."""
    allow_other_dtype: bool = False
    """Run a checkpoint on input of another pixel type than it was trained on (uint8 against
    uint16, say). Refused by default: scaled by another maximum, the values mean something else
    to the network, which then labels whole images one class without any other sign."""

    def __post_init__(self) -> None:
        for color in self.class_colors or ():
            if not re.fullmatch(r"#[0-9A-Fa-f]{6}", color):
                raise ConfigError(f"Expected a colour like '#E6194B' in 'model.class_colors'. Got {color!r} instead.")
        if self.mean is not None and not all(math.isfinite(v) for v in self.mean):
            raise ConfigError(f"Expected finite numbers for 'model.mean'. Got {list(self.mean)} instead.")
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ConfigError(
                "Expected positive numbers for 'model.std' (each channel is divided by it). "
                f"Got {list(self.std)} instead."
            )


@dataclass(frozen=True)
class TilingConfig:
    tile: int = 512
    """Core size in pixels: one output chunk. The halo comes from the model, not from here."""
    batch: int = 4
    """Tiles per task in a row (blended tiling, pyramid levels); plain tasks are 2 x 2 blocks."""
    forward_batch: int | None = None
    """Tiles per forward pass. None: 1 on the CPU (batching measured no faster there, and each
    tile's activations add to the peak memory), 4 on a GPU."""
    forward_tile: int | None = None
    """Predict each tile in pieces of this side (a multiple of the network's stride), each read with
    the halo. None: whole tiles, except on a CPU where a pass would allocate tensors of over 8 MiB
    and a divisor of the tile avoids that for at most 5% more computed pixels: the pieces'
    activations stay in the processor's cache (see ``FORWARD_BYTES`` in pipeline.model.predictor)."""
    halo: int | None = None
    """Pixels read around each core. None: the exact halo measured from the model; smaller is
    faster but approximate (see ``blend``)."""
    blend: BlendMode = "none"
    """With a halo below the exact one: gaussian / cosine take a weighted mean of overlapping windows."""

    def __post_init__(self) -> None:
        _positive(self.tile, "tiling.tile", MAX_TILE)
        _positive(self.batch, "tiling.batch", 64)
        _positive(self.forward_batch, "tiling.forward_batch", 256)
        _positive(self.forward_tile, "tiling.forward_tile", MAX_TILE)
        if self.forward_tile is not None and self.blend != "none":
            raise ConfigError("tiling.forward_tile cannot be used with tiling.blend: blending weights whole windows")
        if self.halo is not None:
            _non_negative(self.halo, "tiling.halo", MAX_TILE)
        if self.blend != "none" and self.halo is None:
            raise ConfigError(
                f"tiling.blend {self.blend} needs tiling.halo: with the exact halo tiling is already exact"
            )


@dataclass(frozen=True)
class OutputConfig:
    path: str | None = None
    """The Zarr store to write."""
    dtype: OutputDtype = "uint8"
    """Stored probabilities: uint8 holding round(p * 254) (steps of 0.004, a quarter of the bytes to
    compress and write; 255 is no data), float16, or float32 for the network's values as they are
    (NaN is no data)."""
    overwrite: bool = False
    """Replace an existing store. Without it an existing output is never touched."""
    format: OutputFormat = "ome-zarr-0.4"
    """OME-NGFF 0.4 on Zarr format 2 (QuPath, GDAL < 3.11, napari) or 0.5 on Zarr format 3."""
    resume: bool = False
    """Continue an interrupted store: compute only the chunks it lacks, after checking that the
    input, the model and the config are those it was started with. A complete store is left as it is."""
    shard: int | None = None
    """Chunks per shard side, for ``ome-zarr-0.5``: every level in Zarr v3 shards of ``shard x shard``
    chunks (classes whole), a file each instead of one per chunk, for inode quotas. Each task writes
    whole shards, so no two writers share one. None: a file per chunk."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for an ``s3://`` output, e.g. ``{profile: lab}``; None: the standard AWS
    environment. Stored by their names only, as ``input.storage_options``."""

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("Give output.resume or output.overwrite, not both: one keeps the store, one replaces it")
        if self.shard is not None:
            _positive(self.shard, "output.shard", 1024)  # 1024 chunks of 512 px: 524288 px a side
            if self.format != "ome-zarr-0.5":
                raise ConfigError(
                    "Expected output.format ome-zarr-0.5 with output.shard (shards are Zarr v3's). "
                    f"Got {self.format} (Zarr v2) instead; {option('output.format', 'ome-zarr-0.5')} to shard the store"
                )


@dataclass(frozen=True)
class MaskConfig:
    mode: str = "auto"
    """Which chunks to compute. ``auto``: for a slide, tissue found on a low-resolution level;
    for a raster, its no-data value or alpha band. ``none``: every chunk. Otherwise the path of a
    mask image (TIFF or PNG, any size, non-zero = compute)."""
    threshold: float | None = None
    """Saturation above which a pixel is tissue, in [0, 1]. None: Otsu's threshold, kept in [0.04, 0.15]."""

    def __post_init__(self) -> None:
        if not self.mode:
            raise ConfigError("Expected auto, none or a mask image path for 'mask.mode'. Got '' instead.")
        if self.threshold is not None:
            parse_number(self.threshold, "mask.threshold", minimum=0, maximum=1)

    @property
    def kind(self) -> MaskKind:
        """``auto``, ``none``, or ``image`` (:attr:`mode` is the path of a mask image)."""
        if self.mode == "auto":
            return "auto"
        return "none" if self.mode == "none" else "image"

    @property
    def image(self) -> str | None:
        """The mask image's path, for :attr:`kind` ``image``."""
        return None if self.mode in ("auto", "none") else self.mode


@dataclass(frozen=True)
class ComputeConfig:
    device: Device = "auto"
    """auto picks CUDA, then MPS, then the CPU."""
    precision: Precision = "float32"
    """Arithmetic of the forward pass; float16 / bfloat16 only on CUDA."""
    workers: int | None = None
    """Tasks run at once (Dask threads). None: chosen with torch_threads to fill the cores."""
    torch_threads: int | None = None
    """Intra-op threads of each forward pass. None: cores divided by workers."""
    progress: bool = True
    """Show a progress bar (only ever on a terminal)."""
    scheduler: str = "threads"
    """Where tasks run: ``threads`` (this process, no set-up), ``processes`` (a local Dask cluster of ``workers``
    processes), ``tcp://host:port`` or ``tls://host:port`` (an existing Dask scheduler), ``slurm`` / ``pbs`` /
    ``sge`` (a cluster of batch jobs started for the run by dask-jobqueue, see ``cluster``) or ``local-jobs``
    (the same job script run as local processes: a cluster config tried on one machine)."""
    tls: bool = True
    """TLS for the clusters fcnpipe starts (processes, job queues); false (plain TCP): where nobody else listens."""
    tls_ca_file: str | None = None
    """PEM certificate authority (``dask scheduler --tls-ca-file``). None: certificates made for the run."""
    tls_cert: str | None = None
    """PEM certificate of this process and of the workers fcnpipe starts (``--tls-cert``)."""
    tls_key: str | None = None
    """PEM key of ``tls_cert``. None: the key is in the certificate file."""
    dashboard_address: str = "127.0.0.1:0"
    """Where the dashboard of a cluster fcnpipe starts listens (port 0: any); ``:8787``: every interface."""

    def __post_init__(self) -> None:
        _positive(self.workers, "compute.workers", 4096)
        _positive(self.torch_threads, "compute.torch_threads", 1024)
        if self.scheduler not in SCHEDULERS and "://" not in self.scheduler:
            raise ConfigError(
                f"Expected one of {', '.join(SCHEDULERS)} or an address like tcp://host:8786 for "
                f"'compute.scheduler'. Got {self.scheduler!r} instead."
            )
        if (self.tls_ca_file is None) != (self.tls_cert is None) or (self.tls_key and not self.tls_cert):
            raise ConfigError("Give compute.tls_ca_file and compute.tls_cert together, and compute.tls_key with them")
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]*):\d{1,5}", self.dashboard_address):
            raise ConfigError(f"Expected HOST:PORT for 'compute.dashboard_address'. Got {self.dashboard_address!r}.")


SCHEDULERS = ("threads", "processes", "slurm", "pbs", "sge", "local-jobs")
JOB_QUEUES = ("slurm", "pbs", "sge", "local-jobs")


@dataclass(frozen=True)
class ClusterConfig:
    """The batch jobs dask-jobqueue submits for ``compute.scheduler: slurm | pbs | sge``.

    Each job runs ``processes`` Dask worker processes on ``cores`` cores; the run scales between
    ``minimum_jobs`` and ``maximum_jobs`` jobs with the work left (adaptive).
    """

    queue: str | None = None
    """Partition (SLURM) or queue (PBS, SGE)."""
    account: str | None = None
    """Account / project to charge."""
    cores: int = 8
    """Cores per job."""
    memory: str = "32GB"
    """Memory per job."""
    processes: int = 1
    """Dask worker processes per job; each gets cores / processes threads, one task per thread."""
    walltime: str = "12:00:00"
    gpus: int = 0
    """GPUs per job: 0 or 1. With 1, each job is one worker declaring the resource GPU=1, so that a
    GPU runs one task (one model) at a time; set compute.device: cuda."""
    minimum_jobs: int = 0
    maximum_jobs: int = 4
    job_extra_directives: tuple[str, ...] = ()
    """Extra scheduler lines, e.g. ["--constraint=skylake"] (SLURM) or ["-l select=1:ngpus=1"] (PBS)."""
    job_script_prologue: tuple[str, ...] = ()
    """Shell lines run before the worker starts, e.g. ["module load cuda", "source ~/fcnpipe/.venv/bin/activate"]."""
    local_directory: str | None = None
    """Worker scratch space on the node, e.g. $TMPDIR."""
    log_directory: str | None = None
    """Where the jobs' stdout / stderr go."""
    interface: str | None = None
    """Network interface the workers and scheduler talk over, e.g. ib0."""
    credentials_directory: str | None = None
    """Folder the nodes share, for the run's own TLS files the jobs read (yours only, then removed). None: cwd."""

    def __post_init__(self) -> None:
        for key in ("cores", "processes", "maximum_jobs"):
            _positive(getattr(self, key), f"cluster.{key}", 100_000)
        _non_negative(self.minimum_jobs, "cluster.minimum_jobs", 100_000)
        if self.minimum_jobs > self.maximum_jobs:
            raise ConfigError(
                f"cluster.minimum_jobs ({self.minimum_jobs}) is above cluster.maximum_jobs ({self.maximum_jobs})"
            )
        if self.gpus not in (0, 1):
            raise ConfigError(
                f"Expected 0 or 1 for 'cluster.gpus'. Got {self.gpus} instead: ask for more jobs, one GPU each"
            )
        if self.processes > self.cores:
            raise ConfigError(f"cluster.processes ({self.processes}) is above cluster.cores ({self.cores})")


@dataclass(frozen=True)
class RunConfig:
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as YAML or JSON would hold it."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        plain["input"]["path"] = None if self.input.path is None else remote.redact(self.input.path)
        options = plain["input"].get("storage_options")
        if options:  # credentials never leave the process: not in a record, a log or a manifest
            plain["input"]["storage_options"] = {key: "<hidden>" for key in options}
        options = plain["output"].get("storage_options")
        if options:
            plain["output"]["storage_options"] = {key: "<hidden>" for key in options}
        if self.output.path is not None:
            plain["output"]["path"] = remote.redact(self.output.path)
        return plain


def config_keys(cls: type[Any] = RunConfig, prefix: str = "") -> list[str]:
    """Every key of the schema, as ``"section.name"`` paths, in declaration order.

    >>> config_keys()[:3]
    ['input.path', 'input.series', 'input.level']
    """
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        path = f"{prefix}{item.name}"
        hint = hints[item.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{path}.")
        else:
            keys.append(path)
    return keys


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def load_config(
    files: typing.Sequence[str | os.PathLike[str]] = (), overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Defaults, then each YAML file (a path, or the name of a preset: :func:`pipeline.presets.config_file`),
    then ``overrides`` (nested like the YAML), validated."""
    merged: dict[str, Any] = {}
    for file in files:
        data = read_yaml(config_file(file))
        try:
            parse_dataclass(RunConfig, data, "")  # each file valid on its own, so errors can name it
        except ConfigError as err:
            raise ConfigError(f"{os.fspath(file)}: {err}") from err
        merged = merge(merged, data)
    merged = merge(merged, dict(overrides or {}))
    config: RunConfig = parse_dataclass(RunConfig, merged, "")
    return config
