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
import sys
from pathlib import Path

from common import REPO

# room -> (omnistream rooms it may import, libraries it may import, libraries it must never reach, not even
# through the rooms it imports). Mirrors docs/architecture.md's table; the standard library is always allowed.
LAYERS: dict[str, tuple[set[str], set[str], set[str]]] = {
    # common: numpy for the token stream's contract; torch and DeepSpeed only inside common.checkpoint's loader
    "common": (set(), {"numpy", "torch", "deepspeed"}, {"ray", "mlflow", "pydantic", "PIL", "torch"}),
    "model": ({"common"}, {"torch"}, {"ray", "deepspeed", "mlflow", "pydantic"}),
    "modalities": (
        {"common"},
        {"numpy", "torch", "torchaudio", "PIL", "pydantic", "tokenizers", "safetensors", "soundfile", "pystoi"},
        {"ray", "deepspeed", "mlflow"},
    ),
    "pipelines": (
        {"common", "modalities"},
        {
            "ray",
            "numpy",
            "pyarrow",
            "fsspec",
            "pydantic",
            "PIL",
            "soundfile",
            "webdataset",
            "braceexpand",
            "zstandard",
            "tqdm",
            "torch",
            "matplotlib",
        },
        {"deepspeed", "mlflow"},
    ),
    "tracking": ({"common"}, {"mlflow", "tensorboard", "PIL", "psutil", "pydantic"}, {"ray", "deepspeed", "torch"}),
    "configs": (
        {"common", "modalities", "model", "pipelines", "tracking"},
        {"pydantic", "tomli_w"},
        {"ray", "deepspeed", "mlflow", "torch"},
    ),
    "training": (
        {"common", "model", "modalities", "configs", "tracking"},
        {"torch", "deepspeed", "numpy", "fsspec"},
        {"ray", "mlflow"},
    ),
    "serving": (
        {"common", "model", "modalities", "configs", "tracking"},
        {"torch", "mlflow", "pandas", "safetensors", "tqdm"},
        {"ray"},
    ),
    "cluster": (
        {"common", "model", "modalities", "pipelines", "configs", "tracking", "training", "serving"},
        {"ray", "torch", "deepspeed", "fsspec", "pyarrow", "psutil"},
        set(),
    ),
    "cli": (
        {"common", "model", "modalities", "pipelines", "configs", "tracking", "training", "serving", "cluster"},
        {"numpy", "PIL", "mlflow", "pandas"},
        set(),
    ),
}
# what a room's modules may import only inside functions (common's checkpoint loader: torch, DeepSpeed)
LAZY_ONLY: dict[str, set[str]] = {"common": {"torch", "deepspeed"}}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


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
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.level and not node.module:  # `from . import x`: x is a module of the package
                out += [(node.lineno, f"{mod}.{a.name}", id(node) in top) for a in node.names]
            else:
                out.append((node.lineno, mod, id(node) in top))
    return out


def modules(root: Path = REPO) -> dict[str, tuple[Path, list]]:
    """omnistream module name -> (file, its imports) for every module of every room."""
    out: dict[str, tuple[Path, list]] = {}
    for room in LAYERS:
        for f in sorted((root / room).rglob("*.py")):
            rel = f.relative_to(root / room).with_suffix("")
            name = ".".join(["omnistream", room, *rel.parts]).removesuffix(".__init__")
            out[name] = (f, _imports(f, room, root))
    return out


def _target(mod: str, mods: dict) -> str | None:
    """The omnistream module an import names (`from .x import name` names a module or a name in one)."""
    return next((m for m in (mod, mod.rsplit(".", 1)[0]) if m in mods), None)


def _loaded(name: str, mods: dict) -> list[str]:
    """What importing module `name` runs besides it: its parent packages' __init__ files, outermost first
    (`import omnistream.pipelines.config` runs pipelines/__init__.py before config.py)."""
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if p in mods]


def violations(root: Path = REPO) -> list[str]:
    """Every import that breaks LAYERS, as 'file:line: what', directly or through the modules it pulls in."""
    mods = modules(root)
    bad = []
    for name, (f, imps) in mods.items():
        room = name.split(".")[1]
        rooms, libraries, never = LAYERS[room]
        for line, mod, at_import in imps:
            parts = mod.split(".")
            where = f"{f.relative_to(root)}:{line}"
            if parts[0] == "omnistream" and len(parts) > 1 and parts[1] != room and parts[1] not in rooms:
                bad.append(f"{where}: imports {mod}; {room}/ may import only {sorted(rooms) or 'no other room'}")
            elif parts[0] in never and parts[0] not in LAZY_ONLY.get(room, ()):
                bad.append(f"{where}: imports {mod}; {room}/ never imports {parts[0]}")
            elif parts[0] in LAZY_ONLY.get(room, ()) and at_import:
                bad.append(f"{where}: imports {mod} at import time; {room}/ imports {parts[0]} only inside functions")
            elif parts[0] not in STDLIB and parts[0] != "omnistream" and parts[0] not in libraries:
                bad.append(
                    f"{where}: imports {parts[0]}, not a library {room}/ uses (docs/architecture.md lists "
                    f"{', '.join(sorted(libraries))})"
                )
        # what importing this module pulls in: its parent packages' __init__ files, then every import-time
        # import, followed through omnistream's modules
        seen = {name, *_loaded(name, mods)}
        todo = [(m, f"the package's {mods[m][0].relative_to(root)}") for m in _loaded(name, mods)] + [(name, "")]
        while todo:
            current, via = todo.pop()
            for line, mod, at_import in mods[current][1]:
                if not at_import:
                    continue
                if mod.split(".")[0] in never and current != name:
                    bad.append(
                        f"{f.relative_to(root)}: importing it imports {mod}, through "
                        f"{mods[current][0].relative_to(root)}:{line}{' (' + via + ')' if via else ''}; "
                        f"{room}/ never imports {mod.split('.')[0]}"
                    )
                target = _target(mod, mods)
                for t in [*_loaded(target, mods), target] if target else []:
                    if t not in seen:
                        seen.add(t)
                        todo.append((t, via or f"reached from line {line} of {mods[current][0].relative_to(root)}"))
    return sorted(set(bad))


def import_cycles(root: Path = REPO) -> list[list[str]]:
    """Every set of modules that import each other in a circle, counting imports inside functions and the
    package __init__ files an import runs (Tarjan's strongly connected components)."""
    mods = modules(root)
    graph = {}
    for name, (_, imps) in mods.items():
        targets = {t for _, mod, _ in imps if (t := _target(mod, mods))}
        graph[name] = {x for t in targets for x in (*_loaded(t, mods), t)} - {name, *_loaded(name, mods)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_room_imports_only_downwards():
    assert violations() == []


def test_no_module_imports_itself_round_a_circle():
    """No import cycle among omnistream's modules, at import time or inside functions: a cycle held together
    by function-level imports is a design that cannot be read top to bottom (and breaks when one of those
    imports moves to the top)."""
    assert import_cycles() == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    for room in LAYERS:
        shutil.copytree(REPO / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    f = tmp_path / "pipelines" / "shards.py"
    f.write_text(f.read_text() + "\n\ndef later():\n    from .tokenize import build_cache\n")
    assert any(
        {"omnistream.pipelines.shards", "omnistream.pipelines.tokenize"} <= set(c) for c in import_cycles(tmp_path)
    ), import_cycles(tmp_path)


def test_the_check_names_a_training_module_that_imports_ray(tmp_path):
    """The check can fail: a copy of the tree where one training module imports Ray (at the top, and
    through a pipelines module that the trainer imports) is reported with the file and the import."""
    for room in LAYERS:
        shutil.copytree(REPO / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "training" / "metrics.py").write_text(
        (tmp_path / "training" / "metrics.py").read_text() + "\nimport ray\n"
    )
    found = violations(tmp_path)
    assert any(v.startswith("training/metrics.py:") and "never imports ray" in v for v in found), found
    # and through other rooms: the data config, which the trainer reaches through configs/, starts importing Ray
    (tmp_path / "training" / "metrics.py").write_text((REPO / "training" / "metrics.py").read_text())
    data_config = tmp_path / "pipelines" / "config.py"
    data_config.write_text("import ray  # noqa\n" + data_config.read_text())
    found = violations(tmp_path)
    assert any(
        v.startswith("training/trainer.py: importing it imports ray, through pipelines/config.py:1") for v in found
    ), found
    # a package's __init__.py runs before any of its modules: Ray there reaches configs/ and training/
    (tmp_path / "pipelines" / "config.py").write_text((REPO / "pipelines" / "config.py").read_text())
    init = tmp_path / "pipelines" / "__init__.py"
    init.write_text(init.read_text() + "\nimport ray\n")
    found = violations(tmp_path)
    assert any(
        v.startswith("configs/schema.py: importing it imports ray, through pipelines/__init__.py:") for v in found
    ), found
    assert any(v.startswith("training/trainer.py: importing it imports ray") for v in found), found
    init.write_text((REPO / "pipelines" / "__init__.py").read_text())
    # and the package's own __init__.py: configs/ never imports Ray, nor does anything importing configs/
    init = tmp_path / "configs" / "__init__.py"
    init.write_text(init.read_text() + "\nimport ray\n")
    found = violations(tmp_path)
    assert any(v.startswith("configs/__init__.py:") and "configs/ never imports ray" in v for v in found), found
    assert any(
        v.startswith("configs/schema.py: importing it imports ray, through configs/__init__.py:") for v in found
    ), found
    init.write_text((REPO / "configs" / "__init__.py").read_text())
    # a library no room lists
    (tmp_path / "model" / "config.py").write_text("import requests\n" + (REPO / "model" / "config.py").read_text())
    assert any(
        v.startswith("model/config.py:1: imports requests, not a library model/ uses") for v in violations(tmp_path)
    )
    (tmp_path / "model" / "config.py").write_text((REPO / "model" / "config.py").read_text())
    # a room importing a room above it
    (tmp_path / "tracking" / "base.py").write_text(
        "from omnistream.training import trainer\n" + (REPO / "tracking" / "base.py").read_text()
    )
    assert any(v.startswith("tracking/base.py:1: imports omnistream.training") for v in violations(tmp_path))


def _defined(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments), not those it imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def second_import_paths(root: Path = REPO) -> list[str]:
    """Every `from omnistream.x.y import name` (in the package, its tests, benchmarks and examples) that takes
    `name` from a module that only imports it: each public name has one home, the module that defines it, and
    a package's __init__.py (its published surface) is the only place that may hand it on."""
    mods = modules(root)
    defined = {name: _defined(f) for name, (f, _) in mods.items()}
    found = []
    for f in sorted(p for d in [*LAYERS, "tests", "benchmarks", "examples"] for p in (root / d).rglob("*.py")):
        rel = f.relative_to(root)
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                package = ["omnistream", rel.parts[0], *rel.parent.parts[1:]]
                mod = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod not in mods or mods[mod][0].name == "__init__.py":
                continue
            for alias in node.names:
                if alias.name not in defined[mod] and f"{mod}.{alias.name}" not in mods:
                    found.append(f"{rel}:{node.lineno}: takes {alias.name} from {mod}, which does not define it")
    return found


def test_each_public_name_has_one_import_path():
    assert second_import_paths() == []


def test_the_import_path_check_finds_a_second_path(tmp_path):
    for room in LAYERS:
        shutil.copytree(REPO / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("from omnistream.pipelines.rows import DataConfig\n")
    assert second_import_paths(tmp_path) == [
        "tests/test_x.py:1: takes DataConfig from omnistream.pipelines.rows, which does not define it"
    ]


# The modules whose classes and functions Ray's own processes unpickle in every run: Ray Train's
# DatasetManager (the split), Ray Data's map workers and coordinators (the stream's stages), the ledger and
# dedup actors. None of them uses torch, and importing it cost Ray Train's DatasetManager 1.7 s of a core per run.
RAY_SIDE_MODULES = (
    "omnistream.cluster.split",
    "omnistream.pipelines.rows",
    "omnistream.pipelines.stream",
    "omnistream.pipelines.sources",
    "omnistream.pipelines.ledger",
    "omnistream.pipelines.dedup",
)


def test_what_rays_own_processes_unpickle_imports_no_torch():
    import subprocess

    code = (
        f"import sys; import {', '.join(RAY_SIDE_MODULES)}; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'mlflow') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
