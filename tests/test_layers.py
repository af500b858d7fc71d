"""The import graph of mtp_dist and data_prep: no cycles, and no module imports from a layer
above its own. Lazy imports inside functions count: they are dependencies too.

Layers, bottom to top (README, Layout):
  foundation  files, errors, watchdog, compat: import nothing of the project
  data prep   data_prep            shards, tokenizers, manifests
  config      config, run_plan     the typed config and what a run derives from it
  model       model, distributed   the architecture, and process groups
  step        schedule, data, checkpointing, metrics
  engines     engines              megatron-core and DeepSpeed behind one table
  inference   inference, sources   KV cache, greedy/speculative decoding; reading a model
  trainer     trainer, preflight (the checks before any process group), init_from
  commands    train, export, report, demo, plan, generate, evaluate
"""

from __future__ import annotations

import ast

from tests.support import ROOT

LAYERS = [
    ("mtp_dist.files", "mtp_dist.errors", "mtp_dist.watchdog", "mtp_dist.compat"),
    ("data_prep",),
    ("mtp_dist.config", "mtp_dist.run_plan"),
    ("mtp_dist.model", "mtp_dist.distributed"),
    ("mtp_dist.schedule", "mtp_dist.data", "mtp_dist.checkpointing", "mtp_dist.metrics"),
    ("mtp_dist.engines",),
    ("mtp_dist.inference", "mtp_dist.sources"),
    ("mtp_dist.trainer", "mtp_dist.preflight", "mtp_dist.init_from"),
    (
        "mtp_dist.train",
        "mtp_dist.export",
        "mtp_dist.report",
        "mtp_dist.demo",
        "mtp_dist.plan",
        "mtp_dist.generate",
        "mtp_dist.evaluate",
    ),
]


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in ("mtp_dist", "data_prep"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = (path, ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (not counting its own parent packages, which
    Python imports on the way to any submodule)."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, tree) in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        deps = {known(t) for t in targets} - {None, name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README's Layout)")


def test_every_module_has_a_layer():
    for module in import_graph():
        if module not in ("mtp_dist",):
            layer_of(module)


def test_no_import_goes_up_a_layer():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in import_graph().items()
        if m != "mtp_dist"
        for d in deps
        if d != "mtp_dist" and layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mtp_dist.engines.megatron" not in graph["mtp_dist.engines"]  # by name, in a table
    assert "mtp_dist.trainer" in graph["mtp_dist.train"]  # imported inside run()
    assert "mtp_dist.compat.cpu" in graph["mtp_dist.distributed"]
