"""Every module imports on its own (no circular imports), lower layers never import higher ones, and no
two modules share a file name."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import trustmatch

PACKAGE = Path(trustmatch.__file__).parent
# docs/architecture.md, "Layers": a module may import only from its own layer or lower ones.
LAYERS = [
    {"core"},  # errors, registries, processes, atomic files, devices and precision, lr schedules
    {"reporting"},  # figures and run comparisons: they draw what they are given, nothing of training
    {"methods"},  # one module per method (config section, selector, step), regularizers, their steps
    {"config"},  # the run's typed config, composed from the methods' sections, and the shipped presets
    {"data", "models", "evaluation"},  # datasets and views; networks; metrics, temperature, forward passes
    {"inference"},  # `trustmatch predict` for each task
    {"tasks"},  # classification and segmentation behind one interface
    {"run"},  # trainer, run directory, checkpoints, loaded runs, `evaluate`
    {"tune"},  # `trustmatch tune`: search spaces, the Optuna study of runs, its report
    {"cli", "__main__", "__init__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> list[str]:
    return sorted(
        "trustmatch." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py"  # runs the CLI when imported
    )


FRESH_IMPORTS = """
import importlib, sys
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n.split(".")[0] == "trustmatch"]:
        del sys.modules[name]  # torch & co stay loaded: each module is imported first, quickly
    try:
        importlib.import_module(module)
    except Exception as e:
        print(f"{module}: {type(e).__name__}: {e}")
"""


@pytest.mark.slow
def test_every_module_imports_first() -> None:
    """Each module imported before any other trustmatch module: a circular import shows up here."""
    done = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *_modules()], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr[-2000:]


def _imported(node: ast.AST) -> list[str]:
    """Absolute trustmatch module names an import statement names (function-local ones too)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        assert node.level == 0, "relative imports hide the layer a module comes from: use absolute ones"
        return [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def test_lower_layers_never_import_higher_ones() -> None:
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert top in LAYER, f"{top} is in no layer: add it to LAYERS here and to docs/architecture.md"
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _imported(node):
                parts = name.split(".")
                if parts[0] == "trustmatch" and len(parts) > 1 and parts[1] in LAYER:
                    assert LAYER[parts[1]] <= LAYER[top], f"{path.relative_to(PACKAGE)} imports {name}"


def test_no_two_modules_share_a_file_name() -> None:
    """A name says what is inside: two ``segmentation.py`` in one package say nothing."""
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
