"""The layout docs/ARCHITECTURE.md describes, kept true by reading the code (`ast`, nothing run).

- `shared/` is in layers, bottom to top: the base modules at its top level (settings, host
  config, telemetry, the `$filter` parser the settings check with), `storage/`, `upstream/`,
  `runtime.py` (which wires storage and upstream clients together per process), `flows/`, `web/`;
  `function_app.py` sits above them all. A module imports only its own layer and the layers below.
- Inside `flows/` the same rule runs in the order a booking meets the flows, read bottom up:
  what they pass between them (`messages`, `bookings`), `directory`, `invoicing`, `sync` (which
  drives the other two), and the views across them (`attention`, `checks`).
- No import cycle among the modules of `shared/` and `sandbox/`.
- No module of `shared/`, `sandbox/` or `bench/` over 500 lines.

Every import counts: at module level, inside a function (a lazy import is still a dependency)
and under `if TYPE_CHECKING:` (a type is too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("shared.settings", "shared.hostconfig", "shared.telemetry", "shared.odata_filter")),
    ("storage", ("shared.storage",)),
    ("upstream", ("shared.upstream",)),
    ("runtime", ("shared.runtime",)),
    ("flows", ("shared.flows",)),
    ("web", ("shared.web",)),
)
"""Bottom to top. A module belongs to the layer of the longest prefix that names it."""

FLOW_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("what flows pass", ("shared.flows.messages", "shared.flows.bookings")),
    ("directory", ("shared.flows.directory",)),
    ("invoicing", ("shared.flows.invoicing",)),
    ("sync", ("shared.flows.sync",)),
    ("views across the flows", ("shared.flows.attention", "shared.flows.checks")),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*packages: str) -> dict[str, Path]:
    return {module_name(path): path for package in packages for path in sorted((ROOT / package).rglob("*.py"))}


ALL = modules("shared", "sandbox")


def imports(name: str, path: Path, known: dict[str, Path] = ALL) -> set[str]:
    """The modules of `known` that `name` imports, wherever the import statement is. `from p
    import x` imports `p.x` when that is a module, else `p`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return {module for module in found if module in known and module != name}


def rank(name: str, ranks: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[int, str] | None:
    """(position, layer name) of the longest prefix in `ranks` that names the module."""
    best: tuple[int, int, str] | None = None
    for position, (layer, prefixes) in enumerate(ranks):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), position, layer)
    return None if best is None else (best[1], best[2])


def upward_imports(ranks: tuple[tuple[str, tuple[str, ...]], ...], within: str) -> list[str]:
    wrong = []
    for name, path in ALL.items():
        if not name.startswith(within + ".") or rank(name, ranks) is None:
            continue
        mine = rank(name, ranks)
        for imported in sorted(imports(name, path)):
            theirs = rank(imported, ranks)
            if theirs is not None and theirs[0] > mine[0]:
                wrong.append(f"{name} ({mine[1]}) imports {imported} ({theirs[1]})")
    return wrong


def test_every_module_of_shared_belongs_to_a_layer():
    homeless = [name for name in ALL if name.startswith("shared.") and rank(name, LAYERS) is None]
    assert homeless == [], f"place these in a layer (and in docs/ARCHITECTURE.md): {homeless}"


def test_each_layer_of_shared_imports_only_its_own_layer_and_the_layers_below():
    assert upward_imports(LAYERS, "shared") == []


def test_the_flows_import_only_the_flows_a_booking_meets_before_them():
    assert upward_imports(FLOW_STAGES, "shared.flows") == []


def test_the_function_app_registers_blueprints_from_the_web_layer_only():
    found = imports("function_app", ROOT / "function_app.py", ALL)
    assert found and all(rank(name, LAYERS)[1] in ("web", "base") for name in found), found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_the_modules_of_shared_and_sandbox():
    graph = {name: imports(name, path) for name, path in ALL.items()}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_lazy_or_type_only_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shared.web import api\n"
                      "def f():\n    from shared.flows.sync import run\n", encoding="utf-8")
    assert imports("shared.x", module) == {"shared.web.api", "shared.flows.sync.run"}


@pytest.mark.parametrize("package", ["shared", "sandbox", "bench"])
def test_no_module_is_over_500_lines(package):
    long = {str(path.relative_to(ROOT)): lines for path in sorted((ROOT / package).rglob("*.py"))
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split by concern: {long}"


def test_starting_the_app_leaves_the_page_and_sign_in_libraries_for_the_first_page():
    """The Functions host imports `function_app` on every cold start, and most instances only sync
    and invoice: Jinja2, Babel and PyJWT (with cryptography's X.509, about 30 ms together) load when a
    page or a sign-in first needs them (`make bench` holds the import to 1.3x its dependencies)."""
    code = ("import sys, function_app; "
            "print(sorted(m for m in ('jinja2', 'babel', 'jwt', 'cryptography.x509') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
