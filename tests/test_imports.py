"""No import circles inside crslight, and the layers stay in order: a static read (``ast``) of every ``import`` in the
package, the ones inside functions included (a lazy import hides a circle, it does not remove it)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crslight"

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: crslight modules it imports}``. ``from a.b import c`` counts as ``a.b.c`` when that is a module, else
    ``a.b``; importing ``a.b.c`` also runs the package ``a.b`` (an edge to it, unless the importer is inside it)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else known(base)
                               for a in node.names)
        deps = set()
        for target in targets - {None, name}:
            parts = target.split(".")
            deps.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                        if p in modules and p != name and not name.startswith(p + "."))
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.add(w)
            on_stack.discard(v)
            if component:
                found.append(component | {v})

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_check_sees_a_circle_hidden_in_a_function(tmp_path):
    """The shape simulator/base.py had: the base class imports its subclasses lazily, the subclasses import it."""
    package = tmp_path / "crslight" / "sim"
    package.mkdir(parents=True)
    (tmp_path / "crslight" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("def resolve(name):\n    from crslight.sim import grounded\n    return grounded\n")
    (package / "grounded.py").write_text("from .base import resolve\n")
    (package / "env.py").write_text("from crslight.sim.base import resolve\n")
    graph = import_graph(tmp_path / "crslight")
    assert graph["crslight.sim.grounded"] == {"crslight.sim.base"}
    assert circles(graph) == [{"crslight.sim.base", "crslight.sim.grounded"}]
    (package / "base.py").write_text("def resolve(name):\n    return name\n")
    assert circles(import_graph(tmp_path / "crslight")) == []


def test_no_import_circle_in_crslight():
    graph = import_graph()
    assert "crslight.simulator.base" in graph and len(graph) > 50  # the package was read
    assert [sorted(c) for c in circles(graph)] == []


def test_layers_schema_signals_data_simulator():
    """The schema and the plugin registry import no crslight module; signals never import the data layer (the schema
    lies below both); the simulator base class knows none of its subclasses; the compatibility re-export
    ``crslight.data.schema`` and the ``crslight simulate`` command module are imported by nothing inside crslight."""
    graph = import_graph()
    assert graph["crslight.schema"] == set() and graph["crslight.plugins"] == set()
    assert {(m, d) for m, deps in graph.items() if m.startswith("crslight.signals") for d in deps
            if d.startswith("crslight.data")} == set()
    assert graph["crslight.simulator.base"] == {"crslight.schema"}
    assert [m for m, deps in graph.items() if "crslight.data.schema" in deps] == []
    assert [m for m, deps in graph.items() if "crslight.simulator.cli" in deps] == ["crslight.cli"]


#: crslight's layers, bottom first: a module imports only from its own layer and the layers below it
LAYERS = (
    {"schema", "plugins", "guards", "errors"},  # plain definitions, nothing of crslight above them
    {"models"},  # backbones, loading, chat-template tokenisation, item scores, the decoding engine
    {"metrics", "signals", "rl"},  # what the models are measured and rewarded with; the RL math
    {"data"},  # corpora and DataModules
    {"simulator"},  # simulated users and the conversation environment
    {"modules"},  # the LightningModules
    {"cli", "lightning_cli", "pipeline", "refresh", "ablation", "compare", "chat", "export", "plots"},  # commands
)


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() if m != "crslight" for d in deps if layer_of(d) > layer_of(m))


def test_every_arrow_points_down_the_layers():
    graph = import_graph()
    assert {m.split(".")[1] for m in graph if "." in m} <= set().union(*LAYERS)  # every package has its layer
    assert upward_arrows(graph) == []


def test_the_layer_check_sees_an_arrow_up():
    graph = {"crslight.models.loading": {"crslight.data.errors"}, "crslight.data.errors": set()}
    assert upward_arrows(graph) == [("crslight.models.loading", "crslight.data.errors")]
