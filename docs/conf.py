"""Sphinx configuration: Markdown pages (MyST), API reference from docstrings, warnings are errors in CI."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "quantsim"
author = "quantsim developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "README.md"]
html_theme = "alabaster"
html_static_path = []
autodoc_member_order = "bysource"
autodoc_typehints = "none"
nitpicky = False
# "{...}" placeholders in JSON examples are not JSON: highlight them loosely instead of failing
suppress_warnings = ["myst.header", "misc.highlighting_failure"]
