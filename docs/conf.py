"""Sphinx configuration: the API reference comes from the docstrings (autodoc), the guide pages are
Markdown (MyST). Built in CI with warnings as errors: `sphinx-build -W -b html docs docs/_build/html`."""
import tinycnn  # the installed package when the docs are built in CI

project = "tinycnn"
author = "the tinycnn developers"
copyright = "2026, the tinycnn developers"
release = version = tinycnn.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
add_module_names = False
default_role = "code"  # `name` in a docstring is code, as in Markdown
html_theme = "alabaster"
html_theme_options = {"description": "A from-scratch CNN framework: NumPy/numba on the CPU, CuPy on the GPU",
                      "page_width": "1320px", "sidebar_width": "240px", "body_max_width": "1040px"}
html_show_sourcelink = False
myst_heading_anchors = 3
