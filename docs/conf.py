"""Sphinx configuration of virtq's documentation site.

Build it (what ``scripts/check`` runs, warnings as errors)::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST); the API reference is generated from the docstrings (one page per
public module, written by ``_ext/virtq_docs.py`` into ``reference/api/``), and so are the
ring pictures and the error tree.  Nothing is fetched from the network.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import virtq  # noqa: E402 - after the path is set

project = "virtq"
author = "the virtq authors"
copyright = "the virtq authors"
release = virtq.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "virtq_docs",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.txt", "images/README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"virtq {release}"
html_static_path: list[str] = []
html_extra_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "description"  # sphinx-autodoc-typehints puts them in the text
typehints_fully_qualified = False
always_document_param_types = False
typehints_document_rtype = True
# Signatures name types that only exist for type checkers (``TYPE_CHECKING`` imports) and
# stdlib internals: say so instead of failing the build on each.
suppress_warnings = ["sphinx_autodoc_typehints.forward_reference",
                     "sphinx_autodoc_typehints.guarded_import"]
