"""Properties of the code itself: no import cycles among tinycnn's modules, no private name used
outside the module that defines it, one atomic-write helper, generated code that is current."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "tinycnn")


def _modules():
    """{dotted module name: (path, is_package)} for every module of tinycnn."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                is_package = rel[-1] == "__init__"
                if is_package:
                    rel = rel[:-1]
                found[".".join(rel)] = (path, is_package)
    return found


MODULES = _modules()


def _imports(name):
    """The tinycnn modules that module `name` imports, anywhere in its body (functions included)."""
    path, is_package = MODULES[name]
    tree = ast.parse(open(path).read(), path)
    package = name if is_package else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{target}.{alias.name}"
                edges.add(sub if sub in MODULES else target)
    return {e for e in edges if e in MODULES and e != name}


def test_no_import_cycles():
    graph = {name: _imports(name) for name in MODULES}
    state = {}
    path = []

    def visit(name):
        state[name] = "active"
        path.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "active":
                cycle = path[path.index(other):] + [other]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(graph) > 30  # the walk saw the whole package


def _defined_names(tree):
    """Every name a module binds at any level: functions, classes, assignments, attributes of self."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _source_files():
    for top in ("tinycnn", "examples", "benchmarks", "tests"):
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(directory, f)


# Private attributes of other projects, read on purpose (not tinycnn names).
FOREIGN_PRIVATES = {
    ("benchmarks/keras_parity/make_fixture.py", "_keras_logits"),  # Keras marks softmax outputs with it
    ("tinycnn/share_process.py", "_exit"),  # os._exit: a forked worker ends without the parent's exit handlers
}


def test_no_private_name_is_used_outside_its_module():
    """A `_name` may be imported or read as an attribute only in the module that defines it."""
    offences = []
    for path in _source_files():
        tree = ast.parse(open(path).read(), path)
        own = _defined_names(tree)
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tinycnn")):
                offences += [f"{rel}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _private(node.attr):
                if node.attr not in own and (rel.replace(os.sep, "/"), node.attr) not in FOREIGN_PRIVATES:
                    offences.append(f"{rel}:{node.lineno} uses .{node.attr}")
    assert not offences, "\n".join(offences)


def test_one_atomic_write_helper_serves_every_writer():
    """Only tinycnn/files.py renames files into place or makes temporary files to do so."""
    offences = []
    for path in _source_files():
        if path.endswith(os.path.join("tinycnn", "files.py")) or os.sep + "tests" + os.sep in path:
            continue
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "mkstemp"):
                if isinstance(node.value, ast.Name) and node.value.id in ("os", "tempfile"):
                    offences.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)


def test_generated_convolution_loops_are_current():
    from tinycnn.kernels import cpu_conv_codegen

    with open(cpu_conv_codegen.TARGET) as f:
        committed = f.read()
    assert committed == cpu_conv_codegen.render(), "run: python -m tinycnn.kernels.cpu_conv_codegen"
    result = subprocess.run([sys.executable, "-m", "tinycnn.kernels.cpu_conv_codegen", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "up to date" in result.stdout


def test_a_changed_generator_is_caught(monkeypatch):
    from tinycnn.kernels import cpu_conv_codegen

    monkeypatch.setattr(cpu_conv_codegen, "HEIGHTS", (8, 6))
    with open(cpu_conv_codegen.TARGET) as f:
        assert f.read() != cpu_conv_codegen.render()
