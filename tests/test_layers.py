"""The package's layer picture (docs/DESIGN.md, "Layers") holds: no module imports from a layer above its
own, and every module of the package has a place in the picture."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxcollab"


def layers() -> list[list[str]]:
    """The units (top-level modules and subpackages) of each line of the picture, top layer first."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    block = re.search(r"## Layers\n\n```\n(.*?)```", text, re.S).group(1)
    out = []
    for line in block.splitlines():
        if not line or line[0].isspace():
            continue  # a description's continuation
        names = re.split(r"\s{2,}", line.strip())[0]
        out.append([n.strip().removesuffix(".py").removesuffix("/") for n in names.split(",")])
    return out


def unit(module: str) -> str:
    """jaxcollab.evaluation.stats -> evaluation; jaxcollab.lora -> lora."""
    return module.split(".")[1]


def imports() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the files where it happens, over every import of the package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        source = parts[1] if len(parts) > 1 else "__init__"
        if source == "__init__":
            continue  # the package's own __init__ holds only the version
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "jaxcollab":
                    targets = [f"jaxcollab.{a.name}" for a in node.names]
                else:
                    targets = [node.module] if node.module.startswith("jaxcollab.") else []
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("jaxcollab.")]
            else:
                continue
            for target in targets:
                if unit(target) != source:
                    edges.setdefault((source, unit(target)), []).append(str(path.relative_to(REPO)))
    return edges


def test_every_module_has_a_place_in_the_picture():
    placed = {name for layer in layers() for name in layer}
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert units - placed == set(), "modules missing from docs/DESIGN.md's layer picture"
    assert placed - units == set(), "names in docs/DESIGN.md's layer picture that are no module"


def test_no_module_imports_from_a_layer_above_its_own():
    level = {name: i for i, layer in enumerate(layers()) for name in layer}
    upward = [f"{a} (layer {level[a]}) imports {b} (layer {level[b]}) in {files[0]}"
              for (a, b), files in sorted(imports().items()) if level[b] < level[a]]
    assert upward == []


def test_the_check_sees_imports():
    edges = imports()
    assert ("experiments", "train") in edges and ("merging", "lora") in edges and ("launch", "experiments") in edges
