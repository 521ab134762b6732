"""The architecture the folders promise (docs/architecture.md, style.md): data moves one way, no module
imports one that imports it back, and no pipeline file grows past what one reads in a sitting."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"api": "diffarc", "codecs": "diffarc.codecs", "pipeline": "diffarc.pipeline", "jobs": "diffarc.jobs"}
MAX_PIPELINE_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: Path, node: ast.stmt, known: dict[str, Path]) -> set[str]:
    """The modules an import statement of module `name` names, by their absolute names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    base = package[: len(package) - node.level + 1] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    # `from . import x` may name a module
    return {f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports, at import time or inside a function (a lazy import still
    ties the two modules together: the circle the issue found, encode ↔ preflight, was one)."""
    edges = set().union(*(imported(name, path, node, known) for node in ast.walk(ast.parse(path.read_text()))))
    return {edge for edge in edges if edge in known and edge != name}


def test_no_module_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    circles = []
    for start in graph:  # a path from a module's imports back to itself
        seen, stack = set(), [(start, (start,))]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" → ".join((*trail, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))
    assert not circles, circles


def test_verify_ray_data_info_and_preflight_import_neither_decode_nor_encode():
    # They read through ArchiveReader and decode through batches.decode_streams; preflight only checks.
    known = modules()
    for name in ("verify", "ray_data", "info", "preflight"):
        module = f"diffarc.pipeline.{name}"
        assert not imports(module, known[module], known) & {"diffarc.pipeline.decode", "diffarc.pipeline.encode"}, name


def test_codecs_import_nothing_from_the_pipeline_or_the_jobs():
    known = modules()
    for name, path in known.items():
        if name.startswith("diffarc.codecs"):
            for node in ast.walk(ast.parse(path.read_text())):  # anywhere, at import time or later
                wrong = {m for m in imported(name, path, node, known) if m.startswith(("diffarc.pipeline", "diffarc.jobs"))}
                assert not wrong, f"{path}: {ast.unparse(node)}"


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pipeline_file_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_PIPELINE_LINES
