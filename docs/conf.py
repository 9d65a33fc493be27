"""Sphinx configuration: Markdown pages through MyST, the API reference through autodoc.

The build needs no network: there is no intersphinx mapping and no remote theme asset.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "flask-ai-metering"
author = "flask-ai-metering contributors"
copyright = "flask-ai-metering contributors"
release = importlib.metadata.version("flask-ai-metering")
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "screenshots"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "alabaster"
html_title = f"flask-ai-metering {release}"
html_static_path: list[str] = []
