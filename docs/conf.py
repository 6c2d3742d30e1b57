"""Sphinx configuration of cynag's documentation.

Build: ``python -m pip install -e ".[docs]" && python -m sphinx -W -b html docs docs/_build/html``.
The pages are Markdown (MyST); the API reference is generated from the
docstrings.  The optional dependencies (PyTorch, CuPy, mpi4py, Chainer) are
mocked, so the build needs none of them; cynag itself (with its compiled
extensions) must be importable.
"""
import sys

import cynag

project = "cynag"
author = "The cynag developers"
copyright = "2026, The cynag developers"
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
toc_object_entries_show_parents = "hide"
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


def _constant_doc(app, what, name, obj, options, lines):
    """A re-exported constant gets the ``#:`` comment of the module defining it.

    autodoc reads ``#:`` comments only in the module a name is documented
    under; for ``cynag.multinode.DEFAULT_BUCKET_BYTES`` (defined in
    ``cynag.multinode.communicator``) it would show ``int``'s docstring.
    """
    if what != "data" or not isinstance(obj, (int, float, str, tuple, frozenset, dict)):
        return
    from sphinx.pycode import ModuleAnalyzer

    modname, _, attr = name.rpartition(".")
    candidates = [modname] + sorted(m for m in list(sys.modules)
                                    if m.startswith(modname + "."))
    for origin in candidates:
        module = sys.modules.get(origin)
        if module is None or getattr(module, attr, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(origin).find_attr_docs()
        except Exception:
            continue
        if ("", attr) in docs:
            lines[:] = [line for line in docs[("", attr)]]
            return
    if lines and type(obj).__doc__ and lines[0] in type(obj).__doc__:
        lines[:] = []  # never the docstring of int, str or tuple


def setup(app):
    app.connect("autodoc-process-docstring", _constant_doc)
