"""The tree reads as the pipeline: imports go down the layers of docs/architecture.md, never up."""

from __future__ import annotations

import ast
from pathlib import Path

# Bottom first; a package may import only those before it (and itself).
LAYERS = ["core", "dicom", "s3", "state", "stores", "transfer", "engine", "cluster", "plan",
          "inventory", "verify", "report", "decommission", "testing", "app", "playbook", "demo", "cli"]
ROOT = Path(__file__).resolve().parents[1] / "cloudexit"


def test_every_package_is_placed() -> None:
    found = {p.name.removesuffix(".py") for p in ROOT.iterdir()
             if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert found == set(LAYERS)


def _cloudexit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a cloudexit module: `from cloudexit.x import`, `from
    cloudexit import x`, `import cloudexit.x` and relative imports (resolved against the
    importing module's package)."""
    package = ("cloudexit", *path.relative_to(ROOT).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cloudexit.")]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "cloudexit":  # `from cloudexit import app`: the layers' names are modules
                found += [(node.lineno, f"cloudexit.{a.name}") for a in node.names if a.name in LAYERS]
            elif module.startswith("cloudexit."):
                found.append((node.lineno, module))
    return found


def test_imports_go_down_the_layers() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts == ("__init__",):
            continue
        mine = LAYERS.index(parts[0])
        for lineno, module in _cloudexit_imports(path):
            if LAYERS.index(module.split(".")[1]) > mine:
                upward.append(f"{path.relative_to(ROOT.parent)}:{lineno} imports {module}")
    assert not upward, "\n".join(upward)


def test_only_the_cli_imports_click() -> None:
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("click", "tqdm") for n in names), path
