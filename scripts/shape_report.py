"""Shape of the package: file and function lengths, internal imports, cycles, the import graph.

Run ``python scripts/shape_report.py [src/mixgeneformer]``; ``--json`` prints the numbers as JSON.
tests/test_shape.py uses :func:`measure` to keep the shape from growing back.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PACKAGE = "mixgeneformer"


@dataclass
class Shape:
    """What :func:`measure` finds in one package folder."""

    file_lines: dict[str, int] = field(default_factory=dict)  # module -> lines
    function_lines: dict[str, int] = field(default_factory=dict)  # module.qualname -> lines
    imports: dict[str, set[str]] = field(default_factory=dict)  # module -> internal modules it imports
    in_function_imports: list[str] = field(default_factory=list)  # "module:line imported"
    any_in_public_signatures: list[str] = field(default_factory=list)

    def cycles(self) -> list[list[str]]:
        """Strongly connected components with more than one module (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for target in sorted(self.imports.get(node, ())):
                if target not in index:
                    visit(target)
                    low[node] = min(low[node], low[target])
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1 or node in self.imports.get(node, ()):
                    found.append(sorted(component))

        for node in sorted(self.imports):
            if node not in index:
                visit(node)
        return found


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts else "__init__"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Internal modules named by an import statement (relative to the package root)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                names.append(alias.name[len(PACKAGE) + 1 :] or "__init__")
        return names
    if node.level == 0:
        if node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
            base = node.module[len(PACKAGE) + 1 :]
        else:
            return []
    else:
        parts = [] if module == "__init__" else module.split(".")
        if not is_package:
            parts = parts[:-1]
        drop = node.level - 1
        if drop:
            parts = parts[:-drop]
        base = ".".join(parts + ([node.module] if node.module else []))
    for alias in node.names:
        names.append(f"{base}.{alias.name}" if base else alias.name)
    return names + [base or "__init__"]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def measure(root: str | Path) -> Shape:
    """Measure every ``.py`` file under ``root`` (the package folder)."""
    root = Path(root)
    shape = Shape()
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(root, p) for p in files}
    for path in files:
        module = _module_name(root, path)
        source = path.read_text()
        tree = ast.parse(source)
        shape.file_lines[module] = len(source.splitlines())
        targets: set[str] = set()

        def walk(node: ast.AST, scope: list[str], in_function: bool, module=module, path=path, targets=targets) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue  # annotations only: no run-time dependency
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    resolved = _resolve(module, path.name == "__init__.py", child)
                    named = [n for n in resolved[:-1] if n in modules] or [n for n in resolved[-1:] if n in modules]
                    if isinstance(child, ast.Import):
                        named = [n for n in resolved if n in modules]
                    targets.update(named)
                    if in_function:
                        internal = bool(named)
                        names = ", ".join(alias.name for alias in child.names)
                        shape.in_function_imports.append(f"{module}:{child.lineno} {names}{' (internal)' if internal else ''}")
                    continue
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualname = scope + [child.name]
                    if not isinstance(child, ast.ClassDef):
                        shape.function_lines[f"{module}.{'.'.join(qualname)}"] = child.end_lineno - child.lineno + 1
                        if not child.name.startswith("_") and not any(s.startswith("_") for s in scope):
                            _check_any(shape, module, ".".join(qualname), child)
                    walk(child, qualname, in_function or not isinstance(child, ast.ClassDef))
                else:
                    walk(child, scope, in_function)

        walk(tree, [], False)
        targets.discard(module)
        shape.imports[module] = targets
    return shape


def _check_any(shape: Shape, module: str, name: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
    annotations.append(node.returns)
    for annotation in annotations:
        if annotation is not None and "Any" in ast.unparse(annotation).replace("dict[str, Any]", ""):
            shape.any_in_public_signatures.append(f"{module}.{name}")
            return


def summary(shape: Shape) -> dict:
    """The numbers of the closing note."""
    files = np.array(list(shape.file_lines.values()))
    functions = np.array(list(shape.function_lines.values()))
    longest = sorted(shape.function_lines.items(), key=lambda kv: -kv[1])
    return {
        "modules": len(files),
        "file_lines_median": float(np.median(files)),
        "file_lines_p90": float(np.percentile(files, 90)),
        "file_lines_max": int(files.max()),
        "files_over_500": sorted(m for m, n in shape.file_lines.items() if n > 500),
        "function_lines_median": float(np.median(functions)),
        "function_lines_p90": float(np.percentile(functions, 90)),
        "function_lines_max": int(functions.max()),
        "functions_over_50": len([n for n in functions if n > 50]),
        "functions_over_60": len([n for n in functions if n > 60]),
        "longest_functions": longest[:10],
        "cycles": shape.cycles(),
        "in_function_imports": len(shape.in_function_imports),
        "in_function_internal_imports": len([i for i in shape.in_function_imports if i.endswith("(internal)")]),
        "public_signatures_with_any": len(shape.any_in_public_signatures),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).parents[1] / "src" / PACKAGE))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--graph", action="store_true", help="print the internal import graph")
    parser.add_argument("--stages", action="store_true", help="print the graph with subpackages collapsed")
    args = parser.parse_args(argv)
    shape = measure(args.root)
    numbers = summary(shape)
    if args.json:
        json.dump(numbers, sys.stdout, indent=1)
        print()
    else:
        for key, value in numbers.items():
            if key == "longest_functions":
                print("longest functions:")
                for name, n in value:
                    print(f"  {n:5d}  {name}")
            elif value is not None:
                print(f"{key}: {value}")
    if args.graph:
        print("import graph (module -> internal modules it imports):")
        for module in sorted(shape.imports):
            print(f"  {module} -> {', '.join(sorted(shape.imports[module])) or '-'}")


    if args.stages:
        print("import graph by stage (subpackages collapsed; module -> what it imports):")
        collapsed: dict[str, set[str]] = {}
        for module, targets in shape.imports.items():
            top = module.split(".")[0]
            collapsed.setdefault(top, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != top)
        for module in sorted(collapsed):
            print(f"  {module} -> {', '.join(sorted(collapsed[module])) or '-'}")


if __name__ == "__main__":
    main()
