"""The table, the notes under it and the plot of ``throughput.py``, from its result rows (plain dicts)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any

LINEAR = 0.10
"""Spread of seconds per megapixel across sizes within which cost counts as linear in pixels."""
HEADER = (
    "arch",
    "size",
    "Mpx",
    "e2e s",
    "s/Mpx",
    "e2e Mpx/s",
    "model Mpx/s",
    "ratio",
    "peak RSS MiB",
    "read %",
    "predict %",
    "write %",
    "MONAI Mpx/s",
    "MONAI MiB",
    "speed x",
    "RSS x",
)
WIDTHS = (-9, 6, 7, 7, 6, 9, 11, 5, 12, 6, 9, 7, 11, 9, 7, 5)
"""Column widths; negative: left-aligned."""


def _line(cells: tuple[str, ...]) -> str:
    return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=True))


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    shares, monai = r["stage_shares"], r["monai"]
    stages = ("n/a",) * 3 if shares is None else tuple(f"{100 * shares[k]:.0f}" for k in ("read", "predict", "write"))
    versus = ("-",) * 4
    if monai is not None:
        versus = (
            f"{monai['mpx_per_s']:.2f}",
            f"{monai['peak_rss_mib']:.0f}",
            f"{r['speed_vs_monai']:.2f}",
            f"{r['rss_vs_monai']:.2f}",
        )
    return (
        r["architecture"],
        str(r["size"]),
        f"{r['mpx']:.1f}",
        f"{r['e2e_s']:.1f}",
        f"{r['s_per_mpx']:.3f}",
        f"{r['e2e_mpx_per_s']:.2f}",
        f"{r['model_mpx_per_s']:.2f}",
        f"{r['ratio']:.2f}",
        f"{r['peak_rss_mib']:.0f}",
        *stages,
        *versus,
    )


def table(rows: list[dict[str, Any]]) -> list[str]:
    """One header line and one line per row (see benchmarks/README.md for the columns)."""
    return [_line(HEADER), *(_line(_cells(r)) for r in rows)]


def _by_arch(rows: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for arch in dict.fromkeys(r["architecture"] for r in rows):
        yield arch, sorted((r for r in rows if r["architecture"] == arch), key=lambda r: r["size"])


def _spread(values: list[float]) -> str:
    spread = max(values) / min(values) - 1
    verdict = "within" if spread <= LINEAR else "OVER"
    return f"{min(values):.3f}-{max(values):.3f} s/Mpx, spread {spread:.0%} ({verdict} {LINEAR:.0%})"


def linearity(rows: list[dict[str, Any]]) -> list[str]:
    """Per architecture, how far seconds per megapixel move across sizes: cost linear in pixels keeps them equal.

    The spread is ``max / min - 1`` of the whole run's s/Mpx (start-up included, so small images cost
    more per pixel) and of the ``compute`` part alone.
    """
    lines = []
    for arch, mine in _by_arch(rows):
        if len(mine) < 2:
            continue
        sizes = f"N={mine[0]['size']}..{mine[-1]['size']}"
        lines.append(
            f"{arch} {sizes}: e2e {_spread([r['s_per_mpx'] for r in mine])}; "
            f"compute {_spread([r['compute_s_per_mpx'] for r in mine])}"
        )
        # compute seconds per second of the model alone, measured beside it: the machine's drift cancels
        relative = [r["model_mpx_per_s"] / r["compute_mpx_per_s"] for r in mine]
        spread = max(relative) / min(relative) - 1
        lines.append(
            f"{arch} {sizes}: compute per model second {min(relative):.2f}-{max(relative):.2f}, "
            f"spread {spread:.0%} ({'within' if spread <= LINEAR else 'OVER'} {LINEAR:.0%})"
        )
    return lines


def overheads(rows: list[dict[str, Any]]) -> list[str]:
    """Per row, the ratio over the level-0 compute alone (the per-tile cost of reading, decoding,
    quantising, compressing and writing beside the network), its ceiling (the network plus decoding
    each file tile once, nothing else: ``decode / (decode + model)`` Mpx/s), and the seconds outside
    the compute that every run pays once: interpreter start-up and imports, setup, the coarser
    pyramid levels."""
    lines = []
    for r in rows:
        timings = r["timings_s"]
        startup = r["e2e_s"] - timings["total"]
        lines.append(
            f"{r['architecture']} N={r['size']}: ratio {r['ratio']:.2f} end to end, "
            f"{r['compute_mpx_per_s'] / r['model_mpx_per_s']:.2f} over the level-0 compute, "
            f"{r['ratio_ceiling']:.2f} at most (decoding alone {r['decode_only']['mpx_per_s']:.0f} Mpx/s); "
            "outside it "
            f"start-up {startup:.1f} s, setup {timings['setup']:.1f} s, "
            f"pyramid {timings.get('pyramid') or 0:.1f} s"
        )
    return lines


def rss_verdict(rows: list[dict[str, Any]]) -> list[str]:
    """Per architecture, whether fcnpipe's peak RSS grows with the image or levels off."""
    lines = []
    for arch, mine in _by_arch(rows):
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        growth = large["peak_rss_mib"] / small["peak_rss_mib"]
        steps = [b["peak_rss_mib"] / a["peak_rss_mib"] for a, b in itertools.pairwise(mine)]
        grows = growth > 1.25 and (not steps or steps[-1] > 1.15)  # still growing at the last step
        lines.append(
            f"{arch}: peak RSS {'GROWS with size' if grows else 'levels off'}: x{growth:.2f} from "
            f"N={small['size']} to N={large['size']} ({large['mpx'] / small['mpx']:.0f}x the pixels); "
            f"step by step: {', '.join(f'x{s:.2f}' for s in steps) or '-'}"
        )
    return lines


def monai_stages(rows: list[dict[str, Any]]) -> list[str]:
    """Where each MONAI run spent its time (in-process; the rest of its wall time is interpreter start-up)."""
    lines = []
    for r in rows:
        monai = r["monai"]
        if monai is not None:
            t = monai["timings_s"]
            parts = ", ".join(f"{k} {t[k]:.2f} s" for k in ("setup", "read", "predict", "write"))
            lines.append(f"MONAI {r['architecture']} N={r['size']}: {parts} of {monai['wall_s']:.1f} s")
    return lines


STYLES = ("-", "--", ":", "-.")


def plot(rows: list[dict[str, Any]], path: str) -> str | None:
    """Mpx/s (left) and peak RSS (right) against image side, log2; one line style per architecture.

    Returns ``path``, or None (with a message) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    for (arch, mine), style in zip(_by_arch(rows), itertools.cycle(STYLES)):
        sizes = [r["size"] for r in mine]
        ran = [r for r in mine if r["monai"] is not None]
        for axes, key, label, colour in (
            (speed, "e2e_mpx_per_s", "fcnpipe end to end", "C0"),
            (speed, "model_mpx_per_s", "model only", "C1"),
            (memory, "peak_rss_mib", "fcnpipe", "C0"),
        ):
            axes.plot(sizes, [r[key] for r in mine], style, color=colour, marker="o", label=f"{arch}: {label}")
        if ran:
            monai_sizes = [r["size"] for r in ran]
            for axes, key in ((speed, "mpx_per_s"), (memory, "peak_rss_mib")):
                values = [r["monai"][key] for r in ran]
                axes.plot(monai_sizes, values, style, color="C2", marker="s", label=f"{arch}: MONAI sliding window")
    sizes = sorted({r["size"] for r in rows})
    for axes, ylabel in ((speed, "megapixels per second"), (memory, "peak RSS (MiB)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [f"{n}²" for n in sizes])
        axes.set_xlabel("image side N (N x N pixels)")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    speed.set_yscale("log")  # the model alone can be 10-100x the end-to-end rate at small sizes
    memory.set_ylim(bottom=0)
    speed.set_title("throughput")
    memory.set_title("peak resident memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
