"""Where the shipped ``templates/``, ``static/`` and ``migrations/`` folders are.

In a wheel they sit inside the package (hatchling maps them there); in a source
checkout they sit at the project's top level, beside the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder ``name`` (``"templates"``, ``"static"`` or ``"migrations"``)."""
    inside = _PACKAGE / name
    if inside.is_dir():
        return inside
    beside = _PACKAGE.parent / name
    if beside.is_dir():
        return beside
    raise FileNotFoundError(f"flask_ai_metering is missing its {name}/ folder (looked in {inside} and {beside})")
