"""Sphinx configuration of the layerpar documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (scripts/run_tests.sh
runs it with warnings as errors).  The pages are Markdown (MyST); the API
reference comes from the docstrings (autodoc + napoleon) and the
configuration reference from ``layerpar.config.DEFAULTS`` and its comments
(``_ext/configref.py``), so neither can drift from the code.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)                       # the source tree's packages
sys.path.insert(0, os.path.join(HERE, "_ext"))  # configref

import layerpar  # noqa: E402

project = "layerpar"
author = "The layerpar developers"
copyright = "2026, The layerpar developers"
release = version = layerpar.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "configref",
    "plaindoc",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
# torch's nn.Module methods are not ours to document
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True

html_theme = "furo"
html_title = f"layerpar {release}"
html_static_path = []
# the build needs no network: no intersphinx, no remote images
suppress_warnings = ["myst.xref_missing"] if os.environ.get("LAYERPAR_DOCS_LAX") else []
