"""The import directions of docs/architecture.md ("Layout"), read from every module's imports.

Each folder is one room; a room may import the rooms below it and the libraries its row names, never a
room above it or a library it must stay free of (training/ never imports Ray, tracking/ never DeepSpeed,
...). Imports inside functions count as well as those at the top. And because a room's modules are
imported by others, what a room pulls in at import time is followed through the rooms it imports:
training/ must not reach Ray through pipelines/ either.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

from common import REPO

# room -> (omnistream rooms it may import, libraries it must never import). Mirrors docs/architecture.md.
LAYERS: dict[str, tuple[set[str], set[str]]] = {
    # common: numpy for the token stream's contract; torch and DeepSpeed only inside common.checkpoint's loader
    "common":     (set(), {"ray", "mlflow", "pydantic", "PIL"}),
    "model":      ({"common"}, {"ray", "deepspeed", "mlflow", "pydantic"}),
    "modalities": ({"common"}, {"ray", "deepspeed", "mlflow"}),
    "pipelines":  ({"common", "modalities"}, {"deepspeed", "mlflow"}),
    "tracking":   ({"common"}, {"ray", "deepspeed", "torch"}),
    "configs":    ({"common", "modalities", "model", "pipelines", "tracking"}, {"ray", "deepspeed", "mlflow", "torch"}),
    "training":   ({"common", "model", "modalities", "configs", "tracking"}, {"ray", "mlflow"}),
    "serving":    ({"common", "model", "modalities", "configs", "tracking"}, {"ray"}),
    "cluster":    ({"common", "model", "modalities", "pipelines", "configs", "tracking", "training", "serving"}, set()),
    "cli":        ({"common", "model", "modalities", "pipelines", "configs", "tracking", "training", "serving",
                    "cluster"}, set()),
}


def _imports(path: Path, room: str, root: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, at import time) for every import of a file; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["omnistream", room] + list(path.relative_to(root / room).parent.parts)
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports inside a top-level `if`/`try` run at import time too
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.level and not node.module:  # `from . import x`: x is a module of the package
                out += [(node.lineno, f"{mod}.{a.name}", id(node) in top) for a in node.names]
            else:
                out.append((node.lineno, mod, id(node) in top))
    return out


def violations(root: Path = REPO) -> list[str]:
    """Every import that breaks LAYERS, as 'file:line: what', directly or through the rooms it imports."""
    modules: dict[str, tuple[Path, list]] = {}
    for room in LAYERS:
        for f in sorted((root / room).rglob("*.py")):
            rel = f.relative_to(root / room).with_suffix("")
            name = ".".join(["omnistream", room, *rel.parts]).removesuffix(".__init__")
            modules[name] = (f, _imports(f, room, root))
    bad = []
    for name, (f, imps) in modules.items():
        room = name.split(".")[1]
        allowed, never = LAYERS[room]
        for line, mod, _ in imps:
            parts = mod.split(".")
            where = f"{f.relative_to(root)}:{line}"
            if parts[0] == "omnistream" and len(parts) > 1 and parts[1] != room and parts[1] not in allowed:
                bad.append(f"{where}: imports {mod}; {room}/ may import only {sorted(allowed) or 'no other room'}")
            elif parts[0] in never:
                bad.append(f"{where}: imports {mod}; {room}/ never imports {parts[0]}")
        # what importing this module pulls in: follow its import-time imports through omnistream's modules
        seen, todo = {name}, [name]
        while todo:
            current = todo.pop()
            for line, mod, at_import in modules[current][1]:
                if not at_import:
                    continue
                if mod.split(".")[0] in never and current != name:
                    bad.append(f"{f.relative_to(root)}: importing it imports {mod}, through {current} (line {line}); "
                               f"{room}/ never imports {mod.split('.')[0]}")
                target = next((m for m in (mod, mod.rsplit(".", 1)[0]) if m in modules), None)
                if target and target not in seen:
                    seen.add(target)
                    todo.append(target)
    return sorted(set(bad))


def test_every_room_imports_only_downwards():
    assert violations() == []


def test_the_check_names_a_training_module_that_imports_ray(tmp_path):
    """The check can fail: a copy of the tree where one training module imports Ray (at the top, and
    through a pipelines module that the trainer imports) is reported with the file and the import."""
    for room in LAYERS:
        shutil.copytree(REPO / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "training" / "metrics.py").write_text((tmp_path / "training" / "metrics.py").read_text() + "\nimport ray\n")
    found = violations(tmp_path)
    assert any(v.startswith("training/metrics.py:") and "never imports ray" in v for v in found), found
    # and through other rooms: the data config, which the trainer reaches through configs/, starts importing Ray
    (tmp_path / "training" / "metrics.py").write_text((REPO / "training" / "metrics.py").read_text())
    data_config = tmp_path / "pipelines" / "config.py"
    data_config.write_text("import ray  # noqa\n" + data_config.read_text())
    found = violations(tmp_path)
    assert any(v.startswith("training/trainer.py: importing it imports ray, through omnistream.pipelines.config")
               for v in found), found
    # a room importing a room above it
    (tmp_path / "tracking" / "base.py").write_text("from omnistream.training import trainer\n"
                                                  + (REPO / "tracking" / "base.py").read_text())
    assert any(v.startswith("tracking/base.py:1: imports omnistream.training") for v in violations(tmp_path))
