"""The package's shape, from its own imports: no import loop anywhere in fedbridge/, and the silo side (the ClientApp
and everything it imports) imports no server module, so a SuperNode never loads the server's methods. The imports
made by name from the registry (``fedbridge.methods.PACKAGES``: the ClientApp imports each method's ``handlers``, the
protocol its ``messages``, the server registry its ``server`` and ``config``) are edges of the graph too, and a fresh
interpreter that imports the ClientApp is checked to have loaded no server module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "fedbridge"
SERVER_SIDE = ("fedbridge.server_app", "fedbridge.methods.base", "fedbridge.methods.registry", "fedbridge.strategies")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: bool = False) -> nx.DiGraph:
    """fedbridge module -> the fedbridge modules it imports (at the top or inside a function: both load it); with
    ``packages``, also each enclosing package's ``__init__``, which importing the module runs (not a loop when that
    ``__init__`` re-exports the module, so the loop check leaves these edges out)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("fedbridge") and target != name:
                    graph.add_edge(name, target)
    for source, target in registry_imports():
        if source in modules and target in modules:
            graph.add_edge(source, target)
    for name in modules if packages else ():  # importing a.b.c runs a/__init__ and a/b/__init__
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and parent != name:
                graph.add_edge(name, parent)
    return graph


# which modules import which part of every registered method's package by name (importlib): static imports miss them
REGISTRY_IMPORTS = {"fedbridge.client_app": ("handlers",), "fedbridge.protocol": ("messages",),
                    "fedbridge.methods.registry": ("server", "config"), "fedbridge.strategies.base": ("messages",)}


def registry_imports() -> list[tuple[str, str]]:
    """(importer, imported) for the imports ``fedbridge.methods.method_module`` makes by name."""
    from fedbridge.methods import PACKAGES

    return [(source, f"{package}.{part}") for source, parts in REGISTRY_IMPORTS.items()
            for package in PACKAGES.values() for part in parts]


def is_server_module(name: str) -> bool:
    return (name in SERVER_SIDE or name.startswith("fedbridge.strategies.")
            or (name.startswith("fedbridge.methods.") and name.endswith(".server")))


def test_fedbridge_has_no_import_loop():
    loops = list(nx.simple_cycles(import_graph()))
    assert not loops, f"import loops: {loops[:5]}"


def test_the_clientapp_imports_no_server_module():
    graph = import_graph(packages=True)
    reached = nx.descendants(graph, "fedbridge.client_app") | {"fedbridge.client_app"}
    server = sorted(m for m in reached if is_server_module(m))
    assert not server, f"the ClientApp side reaches server modules: {server}"
    assert {"fedbridge.methods.fdkt.silo", "fedbridge.methods.crosslm.silo", "fedbridge.methods.social.silo"} <= reached
    assert {f"fedbridge.methods.{m}.handlers" for m in ("local", "fedavg", "fdkt", "crosslm", "social", "pe")} <= reached


def test_every_name_the_silo_side_imports_from_the_registry_is_silo_safe():
    """The ClientApp imports what the registry names through importlib; whatever that loads, in a fresh interpreter,
    is no server module (the static graph cannot see inside ``importlib.import_module``)."""
    code = ("import sys, fedbridge.client_app, fedbridge.protocol as p; p.catalogue(); "
            "print('\\n'.join(m for m in sys.modules if m.startswith('fedbridge')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent, check=True)
    loaded = done.stdout.split()
    assert not (server := sorted(m for m in loaded if is_server_module(m))), f"the silo side loaded {server}"
    reached = nx.descendants(import_graph(packages=True), "fedbridge.client_app") | {"fedbridge.client_app"}
    assert not (unseen := sorted(set(loaded) - reached)), f"the graph misses what the silo side loads: {unseen}"


def test_the_graph_sees_what_a_module_imports():
    # guards the guard: the server does import every method's server module, also through a function-level import
    graph = import_graph()
    assert graph.has_edge("fedbridge.methods.registry", "fedbridge.methods.crosslm.server")
    assert graph.has_edge("fedbridge.simulations.cli", "fedbridge.simulations.runner")  # inside compare()
    assert not graph.has_edge("fedbridge.privacy.audit", "fedbridge.methods.social.config")  # canaries.* is core
    assert is_server_module("fedbridge.methods.fdkt.server") and not is_server_module("fedbridge.methods.fdkt.silo")


def test_each_method_is_one_folder_with_its_server_side():
    from fedbridge.methods.registry import METHODS

    for method in METHODS.values():
        module = method.__module__
        assert module.startswith("fedbridge.methods.") and module.endswith(".server"), module
