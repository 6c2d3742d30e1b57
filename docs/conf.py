"""Sphinx configuration of cynag's documentation.

Build: ``python -m pip install -e ".[docs]" && python -m sphinx -W -b html docs docs/_build/html``.
The pages are Markdown (MyST); the API reference is generated from the
docstrings.  The optional dependencies (PyTorch, CuPy, mpi4py, Chainer) are
mocked, so the build needs none of them; cynag itself (with its compiled
extensions) must be importable.
"""
import cynag

project = "cynag"
author = "cynag contributors"
copyright = "cynag contributors"
version = release = cynag.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_mock_imports = ["torch", "cupy", "cupyx", "mpi4py", "chainer", "chainermn"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields: properties are documented by :members: already.
napoleon_use_ivar = True

# Doctests run on the CPU with NumPy only, single-threaded (deterministic).
doctest_global_setup = """
import numpy as np
import cynag
"""

html_theme = "furo"
html_title = "cynag %s" % release
html_static_path = ["_static"]
html_css_files = ["cynag.css"]
html_show_sourcelink = False
