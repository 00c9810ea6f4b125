"""The layering of the library: imports only go down. Walks every `import` of dspark_jax/ and pallas_kernels/ (the
AST, function-local imports included) and fails on a cycle of modules, a pair of packages importing each other,
or a private name (`_x`) imported from another module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("dspark_jax", "pallas_kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) of every import statement in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out += [(base, alias.name) for alias in node.names]
    return out


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, item in _imports(name, path):
            target = f"{module}.{item}" if item and f"{module}.{item}" in MODULES else module
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def package_of(module: str) -> str:
    """dspark_jax.<pkg> for modules inside a subpackage; top-level modules and pallas_kernels are their own unit."""
    parts = module.split(".")
    if parts[0] == "dspark_jax" and len(parts) >= 2 and (len(parts) > 2 or MODULES[module].name == "__init__.py"):
        return ".".join(parts[:2])
    return module if parts[0] == "dspark_jax" else parts[0]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_no_module_imports_itself_back():
    assert _cycles(_edges()) == []


def test_no_two_packages_import_each_other():
    down: dict[str, set[str]] = {}
    examples: dict[tuple[str, str], str] = {}
    for module, targets in _edges().items():
        for target in targets:
            a, b = package_of(module), package_of(target)
            if a != b:
                down.setdefault(a, set()).add(b)
                examples.setdefault((a, b), f"{module} -> {target}")
    mutual = sorted(f"{examples[a, b]} and {examples[b, a]}" for a in down for b in down[a]
                    if a < b and a in down.get(b, ()))
    assert mutual == []


def test_no_private_name_is_imported_from_another_module():
    borrowed = [f"{name}: from {module} import {item}" for name, path in MODULES.items()
                for module, item in _imports(name, path)
                if item and item.startswith("_") and not item.startswith("__") and module in MODULES
                and module != name]
    assert borrowed == []


def test_the_checks_see_what_they_check():
    """The walk finds the library and its function-local imports; a planted cycle is found."""
    assert len(MODULES) > 100 and "dspark_jax.sampling.threshold" in MODULES
    assert "dspark_jax.drafters.registry" in _edges()["dspark_jax.drafters.checkpoint"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert package_of("dspark_jax.sampling.keys") == "dspark_jax.sampling"
    assert package_of("dspark_jax.target") == "dspark_jax.target"
