"""The options of ``run``, ``plan`` and ``batch``, declared once, as rasterio's ``rio/options.py`` does.

Each option is one row of :data:`RUN_OPTIONS`: its flags, the config key it sets and Click's
settings. The same table builds the commands' options (:func:`run_options`), the config overrides
from what was given (:func:`load`), and the names the CLI shows for config keys in messages
(:data:`FLAGS`): adding an option is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError


def numbers(value: str) -> tuple[float, ...]:
    """``"0.5,0.2"`` -> ``(0.5, 0.2)``."""
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as err:
        raise ConfigError(f"Expected comma-separated numbers. Got {value!r} instead.") from err


def names(value: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``."""
    return tuple(value.split(","))


@dataclass(frozen=True)
class Option:
    """A flag of ``run``/``plan``/``batch`` and the config key it sets."""

    flags: tuple[str, ...]
    key: str
    """``section.name`` in :class:`pipeline.config.RunConfig`."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Click's: ``help``, ``type``, ``is_flag``, ``metavar``."""
    convert: Callable[[Any], Any] | None = None
    """From what Click parsed to the config's value (``"a,b"`` to a tuple)."""

    @property
    def dest(self) -> str:
        """The Python name Click passes the value under."""
        return self.key.replace(".", "__")


RUN_OPTIONS = [
    Option(
        ("-m", "--model"),
        "model.path",
        {"help": "fcnpipe checkpoint, TorchScript file, or state_dict (.pt).  [required, or model.path]"},
    ),
    Option(
        ("--factory",), "model.factory", {"help": "package.module:function that builds the module of a state_dict."}
    ),
    Option(
        ("--level",),
        "input.level",
        {"type": int, "help": "Pyramid level read as it is (0 = full resolution).  [default: by --mpp/--gsd]"},
    ),
    Option(
        ("--mpp",),
        "input.mpp",
        {"type": float, "help": "Read a slide at this many micrometres per pixel.  [default: the model's]"},
    ),
    Option(
        ("--gsd",),
        "input.gsd",
        {"type": float, "help": "Read a raster at this many CRS units per pixel.  [default: the model's]"},
    ),
    Option(
        ("--window",),
        "input.window",
        {
            "type": int,
            "nargs": 4,
            "metavar": "COL_OFF ROW_OFF WIDTH HEIGHT",
            "help": "Run only this window, in pixels of the level read (gdal's -srcwin order): a corner to check a "
            "model on; values equal that window of a full run.",
        },
        tuple,
    ),
    Option(
        ("--bbox",),
        "input.bbox",
        {
            "type": float,
            "nargs": 4,
            "metavar": "MIN_X MIN_Y MAX_X MAX_Y",
            "help": "Run only this box: CRS units for a raster, micrometres from the top-left for a slide.",
        },
        tuple,
    ),
    Option(
        ("--series",), "input.series", {"type": int, "help": "Image series of the file (see inspect).  [default: 0]"}
    ),
    Option(
        ("--mask",),
        "mask.mode",
        {
            "metavar": "auto|none|PATH",
            "help": "Chunks to compute: auto = tissue (or fluorescence) on slides, data "
            "(not nodata/alpha) on rasters; none = all; or a mask image (non-zero = compute).  [default: auto]",
        },
    ),
    Option(
        ("--mask-threshold",),
        "mask.threshold",
        {
            "type": float,
            "help": "Tissue saturation (fluorescence brightness) threshold in [0, 1].  "
            "[default: Otsu's, kept in 0.04-0.15 (0.02-0.2)]",
        },
    ),
    Option(
        ("--tile",), "tiling.tile", {"type": int, "help": "Tile core in pixels = output chunk size.  [default: 512]"}
    ),
    Option(
        ("--batch",),
        "tiling.batch",
        {"type": int, "help": "Tiles per task in a row (blended tiling, pyramid).  [default: 4]"},
    ),
    Option(
        ("--forward-batch",),
        "tiling.forward_batch",
        {"type": int, "help": "Tiles per forward pass.  [default: 1 on CPU, 4 on GPU]"},
    ),
    Option(
        ("--forward-tile",),
        "tiling.forward_tile",
        {
            "type": int,
            "help": "Predict each tile in pieces of this many pixels.  [default: whole tiles, or on a "
            "CPU pieces whose activations stay under 8 MiB]",
        },
    ),
    Option(
        ("--halo",),
        "tiling.halo",
        {"type": int, "help": "Context read around each tile in pixels.  [default: the model's exact halo]"},
    ),
    Option(
        ("--blend",),
        "tiling.blend",
        {
            "type": click.Choice(["none", "gaussian", "cosine"]),
            "help": "Below the exact halo: weighted mean of overlapping windows.  [default: none]",
        },
    ),
    Option(
        ("--dtype",),
        "output.dtype",
        {
            "type": click.Choice(["float32", "float16", "uint8"]),
            "help": "Stored probabilities; uint8 holds round(p*254), 255 = no data.  [default: uint8]",
        },
    ),
    Option(
        ("--format",),
        "output.format",
        {
            "type": click.Choice(["ome-zarr-0.4", "ome-zarr-0.5"]),
            "help": "OME-Zarr 0.4 on Zarr v2 (QuPath, GDAL/QGIS, napari) or 0.5 on Zarr v3.  [default: ome-zarr-0.4]",
        },
    ),
    Option(
        ("--shard",),
        "output.shard",
        {
            "type": int,
            "metavar": "N",
            "help": "With --format ome-zarr-0.5: Zarr v3 shards of N x N chunks, one file each instead of one per "
            "chunk (inode quotas).  [default: none]",
        },
    ),
    Option(
        ("--device",),
        "compute.device",
        {
            "type": click.Choice(["auto", "cpu", "cuda", "mps"]),
            "help": "Where the network runs: auto is a CUDA GPU if PyTorch sees one, else Apple's GPU (mps), "
            "else the CPU.  [default: auto]",
        },
    ),
    Option(
        ("--precision",),
        "compute.precision",
        {
            "type": click.Choice(["float32", "float16", "bfloat16"]),
            "help": "Forward-pass arithmetic; half precision on CUDA only.  [default: float32]",
        },
    ),
    Option(
        ("--tta",),
        "model.tta",
        {"type": click.Choice(["none", "flips"]), "help": "Average the 4 flips of each tile.  [default: none]"},
    ),
    Option(
        ("--scheduler",),
        "compute.scheduler",
        {
            "metavar": "threads|processes|tls://HOST:PORT|tcp://HOST:PORT|slurm|pbs|sge",
            "help": "Where tasks run: this process's threads; a local Dask cluster of --workers processes; a running "
            "Dask scheduler (tls:// with compute.tls_* certificates); or batch jobs started for the run (see "
            "configs/cluster.yaml). Clusters fcnpipe starts use TLS and a loopback dashboard.  [default: threads]",
        },
    ),
    Option(
        ("--workers",),
        "compute.workers",
        {
            "type": int,
            "help": "Tasks at once (threads), or worker processes (--scheduler processes).  [default: by cores]",
        },
    ),
    Option(
        ("--torch-threads",),
        "compute.torch_threads",
        {"type": int, "help": "Threads per forward pass.  [default: cores / workers]"},
    ),
    Option(
        ("--classes",),
        "model.class_names",
        {"help": "Class names in channel order, e.g. background,stroma,tumour."},
        names,
    ),
    Option(("--colors",), "model.class_colors", {"help": "Class colours, e.g. '#F58231,#3CB44B,#E6194B'."}, names),
    Option(
        ("--mean",),
        "model.mean",
        {"help": "Per-channel mean after scaling to [0, 1], e.g. 0.485,0.456,0.406."},
        numbers,
    ),
    Option(("--std",), "model.std", {"help": "Per-channel std after the mean, e.g. 0.229,0.224,0.225."}, numbers),
    Option(
        ("--allow-other-dtype",),
        "model.allow_other_dtype",
        {
            "is_flag": True,
            "help": "Run a checkpoint on pixels of another type (e.g. uint16) than it was trained on (uint8).",
        },
    ),
    Option(("--overwrite",), "output.overwrite", {"is_flag": True, "help": "Replace an existing output store."}),
]
"""The options shared by run, plan and batch."""

RESUME = Option(
    ("--resume",),
    "output.resume",
    {
        "is_flag": True,
        "help": "Continue an interrupted OUTPUT: compute only its missing chunks (same input, model, config).",
    },
)
PROGRESS = Option(
    ("--progress/--no-progress",),
    "compute.progress",
    {
        "help": "A bar with rate and ETA on a terminal; elsewhere (nohup, a log, a cluster job) a line at each tenth "
        "of the work, or every 5 minutes.  [default: on]"
    },
)

FLAGS: dict[str, str] = {
    **{option.key: option.flags[-1] for option in [*RUN_OPTIONS, RESUME]},
    "compute.progress": "--progress",
    "output.path": "-o",
    "input.path": "INPUT",
    "overwrite": "--overwrite",
    "kind": "--as",
    "out_path": "-o",
    "what": "--what",
    "dtype": "--dtype",
    "classes": "--class",
    "creation_options": "--co",
    "nodata": "--nodata",
}
"""How messages name a config key (or an export's argument) on the command line (see
:func:`pipeline.errors.render`)."""


def click_option(option: Option) -> Callable[[Any], Any]:
    """``option`` as a Click decorator; a flag left out is None, so the config's value stands."""
    settings = dict(option.settings)
    if settings.get("is_flag") or any("/" in flag for flag in option.flags):
        settings["default"] = None  # a boolean flag left out would be False
    return click.option(*option.flags, option.dest, **settings)


def run_options(command: Any) -> Any:
    """Decorate ``command`` with every option of :data:`RUN_OPTIONS`, and ``-c``."""
    for option in reversed(RUN_OPTIONS):
        command = click_option(option)(command)
    return click.option(
        "-c",
        "--config",
        "configs",
        multiple=True,
        type=click.Path(),
        help="YAML config; repeat to layer them (later wins; flags win over all).",
    )(command)


def load(configs: tuple[str, ...], given: dict[str, Any], **keys: Any) -> RunConfig:
    """The config from the YAML files, then the options given (Click's values by :attr:`Option.dest`),
    then ``keys`` (``section__name`` = value, for the commands' own arguments)."""
    overrides: dict[str, Any] = {}
    for option in [*RUN_OPTIONS, RESUME, PROGRESS]:
        value = given.get(option.dest)
        if value is not None:
            try:
                _set(overrides, option.key, option.convert(value) if option.convert else value)
            except ConfigError as err:
                raise ConfigError(f"{option.flags[-1]}: {err}") from err
    for dest, value in keys.items():
        if value is not None:
            _set(overrides, dest.replace("__", "."), value)
    try:
        return load_config(configs, overrides)
    except ConfigError as err:  # a flag's value found wrong when checked with the rest: name the flag
        text = str(err)
        for option in RUN_OPTIONS:
            if given.get(option.dest) is not None and f"{option.key!r}" in text:
                raise ConfigError(f"{option.flags[-1]}: {text.replace(f' for {option.key!r}', '')}") from err
        raise


def _set(overrides: dict[str, Any], key: str, value: Any) -> None:
    section, name = key.split(".")
    overrides.setdefault(section, {})[name] = value
