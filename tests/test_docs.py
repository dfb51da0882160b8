"""The documentation: Sphinx builds it from docs/ and the installed package's docstrings with
warnings as errors, every public name has its entry in the API reference, and every guide page
is there."""
import importlib
import os
import re
import subprocess
import sys
import types

import pytest

import tinycnn

from conftest import ROOT

DOCS = os.path.join(ROOT, "docs")
GUIDE = {  # page -> its title: one per topic the documentation promises
    "installing": "Installing",
    "models": "Building models",
    "training": "Training and callbacks",
    "saving": "Saving and loading",
    "devices": "Devices and settings",
    "datasets": "Data sets",
    "gradcheck": "Gradient checking",
    "distributed": "Distributed training",
}
# Public beyond tinycnn.__all__: the ONNX export (python -m tinycnn.onnx) and the error types' home.
EXTRA_MODULES = ("tinycnn.onnx", "tinycnn.errors", "tinycnn.precompile")

pytest.importorskip("sphinx", reason="the docs need Sphinx (pip install -e '.[docs]')")
pytest.importorskip("myst_parser", reason="the docs need myst-parser (pip install -e '.[docs]')")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", DOCS,
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the docs build warned or failed:\n{proc.stderr[-5000:]}"
    return out


def public_modules():
    """tinycnn, every module its __all__ (and theirs, recursively) names, and EXTRA_MODULES."""
    seen, todo = {}, [tinycnn] + [importlib.import_module(name) for name in EXTRA_MODULES]
    while todo:
        module = todo.pop()
        if module.__name__ in seen or not module.__name__.startswith("tinycnn"):
            continue
        seen[module.__name__] = module
        todo += [v for v in (getattr(module, n) for n in public_names(module)) if isinstance(v, types.ModuleType)]
    return seen


def public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    return [n for n in names if not n.startswith("__")]


def all_ids(out):
    ids = set()
    for folder, _, files in os.walk(out):
        for name in files:
            if name.endswith(".html"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    ids.update(re.findall(r'id="([^"]+)"', f.read()))
    return ids


def test_every_public_module_has_a_page(html):
    ids = all_ids(html)
    missing = [name for name in public_modules() if f"module-{name}" not in ids]
    assert not missing, f"public modules without an API page (add docs/api/<name>.rst): {missing}"


def test_every_public_name_is_in_the_api_reference(html):
    ids = all_ids(html)
    modules = public_modules()
    documented = {}  # object -> is it documented under some public name?
    for module_name, module in modules.items():
        for name in public_names(module):
            value = getattr(module, name)
            key = id(value)
            hit = f"{module_name}.{name}" in ids or (isinstance(value, types.ModuleType)
                                                    and f"module-{value.__name__}" in ids)
            documented[key] = documented.get(key, False) or hit
    missing = [f"{m}.{n}" for m, module in modules.items() for n in public_names(module)
               if not documented[id(getattr(module, n))]]
    assert not missing, f"public names the API reference does not document: {missing}"
    assert len(documented) > 150  # the check looked at the whole API, not an empty list


def test_every_guide_page_is_built_with_its_title(html):
    for page, title in GUIDE.items():
        path = html / "guide" / f"{page}.html"
        assert path.exists(), page
        assert f"<title>{title}" in path.read_text(encoding="utf-8"), page
    index = (html / "index.html").read_text(encoding="utf-8")
    for page in GUIDE:
        assert f'href="guide/{page}.html"' in index, f"the index does not link {page}"


def test_the_changelog_names_this_version(html):
    assert f"{tinycnn.__version__} (" in (html / "changelog.html").read_text(encoding="utf-8")
