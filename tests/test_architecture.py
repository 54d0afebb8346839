"""The shape of the house: imports go one way, each concept has one home, the CLI starts light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simcal import choices

SRC = Path(__file__).resolve().parents[1] / "src" / "simcal"
HEAVY = ("torch", "torchvision", "numpy", "PIL", "pycocotools", "matplotlib", "hotcoco", "yaml")


def _modules(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        path = SRC / part
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize(
    "layer", ["data", "modeling", "evaluation", "report", "run", "choices", "config", "io", "seeds", "errors"]
)
def test_lower_layers_never_import_engine_demo_cli_or_api(layer):
    upward = ("simcal.engine", "simcal.demo", "simcal.cli", "simcal.api")
    for path in _modules(layer):
        bad = sorted(n for n in _imports(path) if n.startswith(upward))
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"


def _loaded_after(code: str) -> set[str]:
    """The heavy top-level packages a fresh interpreter has loaded after running ``code``."""
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return set(json.loads(p.stdout.strip().splitlines()[-1])) & set(HEAVY)


def test_version_and_every_help_import_nothing_heavy():
    from simcal.cli import COMMANDS

    calls = [["--version"], ["--help"]] + [[c.name, "--help"] for c in COMMANDS]
    code = "from simcal.cli import main\n" + "".join(
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n" for argv in calls
    )
    assert _loaded_after(code) == set()


def test_run_layout_choices_and_io_are_torch_free():
    loaded = _loaded_after("import simcal.run, simcal.choices, simcal.io, simcal.seeds, simcal.data.label_map")
    assert "torch" not in loaded and "yaml" not in loaded
    assert "torch" not in _loaded_after("import simcal.config, simcal.report.html, simcal.data.stats")


# file names of a run directory: only simcal/run.py may spell them
RUN_FILES = (
    "config.yaml",
    "label_map.json",
    "checkpoint_last.pth",
    "model_final.pth",
    "train_log.jsonl",
    "head.pth",
    "checkpoint.pth",
    "calibration_log.jsonl",
    "summary.json",
    "snapshots",
    "results.json",
    "metrics_",
    "predictions",
    "analysis",
    "index.html",
    "report.json",
)


def test_no_module_but_run_spells_a_run_path():
    for path in _modules("."):
        if path.name == "run.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                value = node.value
                if "\n" in value or " " in value:
                    continue  # prose (docstrings, messages), not a path
                # "metrics_" alone is the head of f"metrics_{iou}.json"; "metrics_bbox.json" the whole name
                hit = [f for f in RUN_FILES if value == f or f.endswith("_") and value.startswith(f) and "." in value]
                assert not hit, f"{path.relative_to(SRC)}:{node.lineno} spells {value!r}: ask simcal.run.Run"


def test_engine_touches_no_private_attribute_and_draws_no_own_stream():
    for path in _modules("engine", "api.py", "demo.py", "cli.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                own = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
                assert own, f"{path.relative_to(SRC)}:{node.lineno} touches private .{node.attr}"
            if isinstance(node, ast.Attribute) and node.attr in ("default_rng", "SeedSequence"):
                raise AssertionError(f"{path.relative_to(SRC)}:{node.lineno}: name the stream in simcal/seeds.py")
        assert "fg_bg_sampler" not in path.read_text(), path


def test_every_choice_has_an_implementation_and_every_implementation_a_name():
    from simcal.modeling import calibration, combine, detector, losses, scoring

    assert set(losses.LOSS_CLASSES) == set(choices.LOSSES)
    for name, spec in choices.LOSSES.items():  # a loss declares the logits it takes: its row's classifier
        assert name == "ce" or losses.LOSS_CLASSES[name].activation == spec.classifier, name
    assert set(calibration._TRAINABLE) == set(choices.CALIBRATED_HEADS)
    assert {layers for kinds in calibration._TRAINABLE.values() for layers in kinds} == set(choices.LAYERS)
    assert set(calibration._MADE) == set(calibration._TRAINABLE) == set(calibration.HEAD_CLASSES)
    assert set(calibration.HEAD_CLASSES) == set(choices.CALIBRATED_HEADS)
    assert set(combine.COMBINERS) | {"det"} == set(choices.COMBINERS)
    assert set(combine.POSTHOC) == set(choices.POSTHOC)
    assert set(scoring.SCORER_KINDS) == set(choices.SCORERS)
    assert set(detector.ARCH_BUILDERS) == set(choices.ARCHS)
    assert set(detector.ROI_HEADS_BUILDERS) == set(choices.ROI_HEADS)
    assert set(detector.NORM_LAYERS) == set(choices.NORMS)


def test_cli_choices_are_the_names_in_simcal_choices():
    from simcal.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001 - argparse's own API
    found = {(name, a.dest): tuple(a.choices) for name, p in sub.items() for a in p._actions if a.choices is not None}
    assert found[("calibrate", "head")] == choices.CALIBRATED_HEADS
    assert found[("calibrate", "layers")] == choices.LAYERS
    assert found[("calibrate", "loss")] == tuple(choices.LOSSES)
    assert found[("calibrate", "sampler")] == choices.CALIBRATION_SAMPLERS
    assert found[("predict", "combine")] == choices.COMBINERS
    assert found[("analyze", "tool")] == choices.ANALYSES
    assert found[("evaluate", "iou")] == choices.EVAL_IOU_TYPES
    assert found[("analyze", "iou")] == choices.IOU_TYPES
    assert found[("demo", "budget")] == choices.DEMO_BUDGETS


#: the layers from the bottom: a module imports only from its own layer or below (at the top or
#: inside a function); ``simcal`` itself (the lazy facade of :mod:`simcal.api`) is left out
LAYERS = (
    ("simcal.errors", "simcal.choices", "simcal.seeds", "simcal.formatting"),
    ("simcal.io", "simcal.run", "simcal.config"),
    ("simcal.data",),
    ("simcal.modeling",),
    ("simcal.evaluation",),
    ("simcal.report",),
    ("simcal.engine",),
    ("simcal.demo", "simcal.api"),
    ("simcal.cli", "simcal.__main__"),
)


def _module_graph() -> dict[str, set[str]]:
    """Every simcal module -> the simcal modules it imports (``from simcal import choices`` is an
    edge to ``simcal.choices``; ``from simcal import __version__`` one to the package, not drawn)."""
    names = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "simcal"):
                    edges.add(target)
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: add it")


def test_imports_run_down_the_layers_and_never_in_a_circle():
    graph = {m: e for m, e in _module_graph().items() if m != "simcal"}
    upward = sorted(f"{m} -> {t}" for m, edges in graph.items() for t in edges if _layer(t) > _layer(m))
    assert not upward, upward
    # a circle inside a layer: depth-first search for a back edge
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(t) :], t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
