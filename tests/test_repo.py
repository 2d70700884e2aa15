"""The repository's promises about itself: CI runs exactly the README's test command."""

import ast
import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    match = re.search(r"^TEST_CMD='([^']+)'", ci, re.M)
    assert match, "the TEST_CMD line is missing from .ci/run"
    readme_commands = [line.split("#")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    assert match.group(1) in readme_commands, "README.md must give the test command that .ci/run runs"


PACKAGE = REPO / "modeling_slstm"


def test_no_cpp_in_python_files():
    """The C++ kernels live in csrc/*.cpp (package data), never in Python strings."""
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text()
        for marker in ("#include <", 'extern "C"', "#pragma omp"):
            assert marker not in text, f"{source.relative_to(REPO)} holds C++ ({marker!r})"
    assert (PACKAGE / "csrc" / "slstm_cpu.cpp").is_file()


def _package_imports(source: Path) -> set[str]:
    """Modules of this package that `source` imports (relative or by the package's name), at any depth."""
    tree = ast.parse(source.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                base = node.module.split(".")[0] if node.module else None
            elif node.module and node.module.split(".")[0] == "modeling_slstm":
                base = node.module.split(".")[1] if "." in node.module else None
            else:
                continue
            found.update([base] if base else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("modeling_slstm."))
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def test_the_package_has_no_import_cycle():
    graph = {path.stem: _package_imports(path) - {path.stem} for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    done, stack = set(), []

    def visit(module):
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(module):] + [module]))
        if module in done:
            return
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert graph["slstm_reference"] == set()  # the oracle is a leaf: torch only
    assert "slstm_cpu" not in graph["modeling_slstm"] | graph["layers_slstm"]  # only the dispatcher calls kernels
