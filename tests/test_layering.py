"""The import graph of the package: every module imports only from its own floor or the floors below it, and
the module-level imports form no cycle. Imports are read with `ast` (module level and inside functions), so the
test needs nothing importable and sees imports a run would not reach.

Floors, lowest first (a module's floor is that of the longest prefix listed):

    0 errors, config, outputs, runtime, macs                    leaves: dataclasses, YAML, overrides, small helpers
    1 ops                                                        pure tensor functions
    2 models (+ the segmentation and early-exit models)          nn.Modules, their configs and builders
    3 io, hub                                                    weights I/O: formats, loaders, name maps, files
    4 presets (+ each task's presets)                            named presets, schedules, the config loader
    5 data, engine, visualize, export (+ the tasks' datasets)   datasets, train/eval loops, export, compile
    6 tasks (+ the old task modules kept as re-exports), serve   a Task per task: train / evaluate / predict; the server
    7 commands, cli, demo (+ the tasks' command lines)           what people run
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cascadevision"

FLOORS = [
    ["errors", "config", "outputs", "runtime", "macs", "early_exit.config"],
    ["ops"],
    ["models", "segmentation.config", "segmentation.model", "early_exit.models", "early_exit.policies",
     "early_exit.execution", "early_exit.training", "early_exit.calibration", "early_exit.stats",
     "early_exit.detection"],
    ["io", "hub"],
    ["presets", "segmentation.presets", "early_exit.presets"],
    ["data", "engine", "visualize", "export", "segmentation.dataset", "segmentation.metrics",
     "segmentation.visualize", "early_exit.data"],
    ["tasks", "pipeline", "weights", "segmentation.engine", "early_exit.pipeline", "early_exit.detector_calibration",
     "serve"],
    ["commands", "cli", "demo", "segmentation.cli", "early_exit.cli"],
]

# Package __init__ modules gather their submodules' names for users; they import upwards by design and are
# not floors of their own (importing `cascadevision.models.backbone` runs them, but nothing imports *from*
# them inside the package except the root's lazy `__getattr__`).
AGGREGATORS = {"", "segmentation", "early_exit", "models", "engine", "data", "ops", "io", "tasks", "serve"}

# Old import paths kept working by a module-level `__getattr__` that imports the new home lazily, each marked
# by a comment in its file. These and only these may point up a floor, and only from inside `__getattr__`.
SHIMS = {
    ("config", "presets"),                      # cascadevision.config.load_config
    ("models.efficientvit", "io.pretrained"),   # load_efficientvit_weights, timm_to_reference_names, URLs
    ("models.hatnet", "io.pretrained"),         # load_hatnet_weights
    ("models.cascade_decoder", "segmentation.model"),  # Segmenter and its losses
    ("segmentation.config", "segmentation.presets"),   # seg presets and load_seg_config
    ("segmentation.config", "segmentation.model"),     # build_segmenter
    ("cli", "tasks.detection"),                 # cascadevision.cli.format_metrics
}
SHIM_FUNCTIONS = {"__getattr__", "_pretrained"}  # _pretrained: the efficientvit shim's loader


# function-local imports with no comment saying why (none left; add one only with a reason)
UNEXPLAINED: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Package modules an import statement names, as names relative to the package ('' = the package)."""
    is_package = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level == 0:
        names = [f"{node.module}.{a.name}" for a in node.names]
    else:
        base = module.split(".") if module else []
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(["cascadevision", *base] + ([node.module] if node.module else []))
        names = [f"{prefix}.{a.name}" for a in node.names]
    found = []
    for name in names:
        if name != "cascadevision" and not name.startswith("cascadevision."):
            continue
        name = name.removeprefix("cascadevision").removeprefix(".")
        while name and name not in MODULES:  # `from .x import function` names the module x
            name = name.rpartition(".")[0]
        found.append(name)
    return found


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, enclosing function or None, line) for every package import of `module`."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, function, child.lineno) for target in resolve(module, child) if target != module)
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text()), None)
    return found


def floor(module: str) -> int | None:
    best, length = None, -1
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = level, len(prefix)
    return best


def test_every_module_has_a_floor():
    assert [m for m in MODULES if m not in AGGREGATORS and floor(m) is None] == []


def test_imports_only_go_down_the_floors():
    upward = []
    for module in MODULES:
        if module in AGGREGATORS:
            continue
        for target, function, line in imports(module):
            if target in AGGREGATORS:
                target_floor = min((floor(m) for m in MODULES if m.startswith(target + ".") and floor(m) is not None),
                                   default=None) if target else None
                if target == "":  # the root package: only its version and lazy names
                    continue
            else:
                target_floor = floor(target)
            if target_floor is not None and target_floor > floor(module):
                shim = any(module == a and (target == b or target.startswith(b + ".")) for a, b in SHIMS)
                if not (shim and function in SHIM_FUNCTIONS):
                    upward.append(f"{module}:{line} imports {target} (floor {floor(module)} -> {target_floor})")
    assert upward == []


@pytest.mark.parametrize("module,forbidden", [
    ("models", ("io", "weights", "hub", "engine", "cli", "data", "presets", "tasks", "pipeline")),
    ("config", tuple(m for m in MODULES if m not in ("errors", "config", ""))),
])
def test_named_rules(module, forbidden):
    """The rules the layout is for, said directly: models never load weights, data or the engine; config
    imports nothing of ours but errors (its lazy `load_config` shim aside)."""
    bad = []
    for name in MODULES:
        if name == module or name.startswith(module + "."):
            for target, function, line in imports(name):
                hit = any(target == f or target.startswith(f + ".") for f in forbidden if f)
                shim = any(name == a and (target == b or target.startswith(b + ".")) for a, b in SHIMS)
                if hit and not (shim and function in SHIM_FUNCTIONS):
                    bad.append(f"{name}:{line} imports {target}")
    assert bad == []


def test_module_level_imports_form_no_cycle():
    graph = {m: {t for t, function, _ in imports(m) if function is None} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_function_level_imports_say_why():
    """A function-local import of one of our modules is a sign of a cycle unless it is a shim or keeps the CLI
    start-up light; each says so in a comment on its line or the lines just above."""
    silent = []
    for module in MODULES:
        lines = MODULES[module].read_text().splitlines()
        for target, function, line in imports(module):
            if function is None:
                continue
            context = "\n".join(lines[max(0, line - 8):line]).lower()
            if "lazy" not in context and "light" not in context and f"{module}:{function}" not in UNEXPLAINED:
                silent.append(f"{module}:{line} ({function}) imports {target}")
    assert silent == []


def test_import_cascadevision_stays_light():
    import subprocess
    import sys

    code = ("import sys, cascadevision; heavy = [m for m in ('torch', 'pycocotools', 'tqdm', "
            "'cascadevision.engine.trainer') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"
