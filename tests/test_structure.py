"""The shape of ``pipeline/``: imports point one way, each library has one owner, modules stay small,
and the README's layout is the tree.

Imports are read from the source (AST), lazy ones inside functions included; only those under
``if TYPE_CHECKING:`` are left out, as they never run.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"

LAYERS = ["base", "source", "model", "store", "compute", "run", "products", "vector", "training", "cli"]
"""The packages in the order data flows through them; a package imports only those before it.
``base`` is the modules at the top of ``pipeline/`` (errors, parse, config, files, tiling)."""

OWNERS = {
    "tifffile": "source",
    "imagecodecs": "source",
    "torch": "model",
    "zarr": "store",
    "numcodecs": "store",
    "pyproj": "store",
    "dask": "compute",
    "distributed": "compute",
    "dask_jobqueue": "compute",
    "rasterio": "products",
    "PIL": "products",
    "shapely": "vector",
    "pyogrio": "vector",
    "click": "cli",
    "tqdm": "cli",
    "yaml": "pipeline.parse",
    "fsspec": "pipeline.remote",
    "s3fs": "pipeline.remote",
    "aiohttp": "pipeline.remote",
}
"""Each third-party library and the one package (or module) that may import it."""
ANYWHERE = {"numpy"}

MAX_LINES = 400
MAX_MODULES = 7
"""Modules per folder, its ``__init__`` aside."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    """The package of ``module`` (``base`` for the modules at the top; the entry point is the CLI's)."""
    parts = module.split(".")
    if module == "pipeline.__main__":
        return "cli"
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    return "base"


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import that can run: a ``from pipeline.x import y`` of a
    submodule ``y`` counts as importing ``pipeline.x.y``."""

    def visit(node: ast.AST) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    yield from visit_one(branch)
            else:
                yield from visit_one(child)

    def visit_one(node: ast.AST) -> Iterator[tuple[str, int]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: a relative import; write pipeline.… in full")
            module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                yield (submodule if submodule in MODULES else module), node.lineno
        yield from visit(node)

    yield from visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))


GRAPH = {
    module: sorted({name for name, _ in imports(path) if name.startswith("pipeline") and name != module})
    for module, path in MODULES.items()
}


def test_the_graph_is_read_from_every_module() -> None:
    """The walk sees lazy imports and skips TYPE_CHECKING ones (the cases this test depends on)."""
    assert len(MODULES) > 40
    assert "pipeline.run.plan" in GRAPH["pipeline.cli.run"]  # imported inside the command function
    report = (PACKAGE / "cli" / "report.py").read_text(encoding="utf-8")
    assert "if TYPE_CHECKING:" in report and "pipeline.run.execute" not in GRAPH["pipeline.cli.report"]


def test_no_import_cycle() -> None:
    """No cycle among the modules, lazy imports included (a cycle hidden by an import inside a function
    still ties the two modules together)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for other in GRAPH.get(module, []):
            if state.get(other) == 1:
                cycle = [*path[path.index(other) :], other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        path.pop()
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module)


def test_packages_import_only_the_layers_before_them() -> None:
    wrong = [
        f"{module} imports {other}"
        for module, others in GRAPH.items()
        for other in others
        if other in MODULES and LAYERS.index(layer(other)) > LAYERS.index(layer(module))
    ]
    assert not wrong, "imports against the data flow (" + " < ".join(LAYERS) + "):\n" + "\n".join(wrong)


def test_each_library_is_imported_by_its_owner_only() -> None:
    stdlib = sys.stdlib_module_names
    wrong = []
    for module, path in MODULES.items():
        for name, line in imports(path):
            top = name.split(".")[0]
            if top in ("pipeline", "__future__") or top in stdlib or top in ANYWHERE:
                continue
            owner = OWNERS.get(top)
            if owner is None:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {top} has no owner in OWNERS")
            elif not (module == owner or layer(module) == owner):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {top}, which is {owner}'s")
    assert not wrong, "\n".join(wrong)


def test_modules_and_folders_stay_small() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for path in MODULES.values()
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    crowded = []
    for folder in [PACKAGE, *(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())]:
        modules = [p.name for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        if len(modules) > MAX_MODULES:
            crowded.append(f"{folder.relative_to(ROOT)}: {len(modules)} modules")
    assert not long and not crowded, "\n".join(long + crowded)


def test_no_assert_and_no_formatter_switched_off() -> None:
    """Input is checked by raising errors (asserts vanish under ``python -O``), and calls are keyword
    calls the formatter can lay out."""
    found = []
    for path in MODULES.values():
        text = path.read_text(encoding="utf-8")
        found += [
            f"{path.relative_to(ROOT)}:{n.lineno}: assert"
            for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.Assert)
        ]
    everywhere = [*MODULES.values(), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    found += [
        f"{path.relative_to(ROOT)}: fmt: skip/off"
        for path in everywhere
        if path.name != "test_structure.py"
        for _ in re.finditer(r"#\s*fmt:\s*(skip|off)", path.read_text(encoding="utf-8"))
    ]
    assert not found, "\n".join(found)


def test_every_module_says_what_it_is() -> None:
    missing = [
        str(path.relative_to(ROOT))
        for path in MODULES.values()
        if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not missing, "no docstring: " + ", ".join(missing)


# --- the README's layout ------------------------------------------------------------------------------------------

BEGIN, END = "<!-- layout: begin (tests/test_structure.py writes it) -->", "<!-- layout: end -->"


def summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    first = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], first).replace("``", "")
    end = re.search(r"(?<=[a-z)0-9])\. ", first)
    return first[: end.start() + 1] if end else first


def layout() -> str:
    """The README's layout: each package, then each module, with its first sentence."""
    lines = ["```"]
    for name in LAYERS:
        if name == "base":
            lines.append(f"{'pipeline/':28}{summary(PACKAGE / '__init__.py')}")
            paths = [p for p in sorted(PACKAGE.glob("*.py")) if p.name != "__init__.py"]
        else:
            lines.append(f"{'  ' + name + '/':28}{summary(PACKAGE / name / '__init__.py')}")
            paths = [p for p in sorted((PACKAGE / name).glob("*.py")) if p.name != "__init__.py"]
        indent = "  " if name == "base" else "    "
        lines += [f"{indent + p.name:28}{summary(p)}" for p in paths]
    lines += [
        f"{'configs/':28}YAML defaults and presets (pathology, satellite, cluster).",
        f"{'workflows/':28}Ready-to-run recipes: the overnight batch, SLURM and PBS jobs.",
        f"{'tests/':28}pytest: synthetic data from fixtures, plus ../shared/data/real.",
        f"{'benchmarks/':28}Throughput and memory, run on demand (benchmarks/README.md).",
        f"{'.ci/run':28}What CI runs: the test command above.",
        "```",
    ]
    return "\n".join(lines)


def test_readme_layout_is_the_tree() -> None:
    """The layout section of README.md is generated from the tree; ``FCNPIPE_UPDATE_README=1`` rewrites it."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        pytest.fail(f"README.md has no {BEGIN} ... {END} section")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    wanted = "\n" + layout() + "\n"
    if os.environ.get("FCNPIPE_UPDATE_README") == "1":
        readme.write_text(text[:start] + wanted + text[stop:], encoding="utf-8")
    assert text[start:stop] == wanted, "README.md's layout is not the tree: rerun with FCNPIPE_UPDATE_README=1"
    for name in ("configs", "workflows", "tests", "benchmarks"):
        assert (ROOT / name).is_dir()
