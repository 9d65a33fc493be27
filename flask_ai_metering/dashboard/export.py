"""``usage.csv``: exactly the rows the explorer's filters select, safe to open in a spreadsheet.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a
formula to Excel and LibreOffice (CSV injection, OWASP); such text cells get a
leading apostrophe. Numbers are written as numbers: a negative amount is data.
"""

from __future__ import annotations

import csv
import io
import typing as t

import sqlalchemy as sa

from ..reporting import queries
from ..reporting.filters import Filters

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
#: Rows fetched per round trip while streaming.
CHUNK = 1000


def safe_cell(value: t.Any) -> t.Any:
    """Neutralise a text cell a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _cell(value: t.Any) -> t.Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return safe_cell(value)


def stream_csv(engine: sa.Engine, f: Filters) -> t.Iterator[str]:
    """Yield the CSV text chunk by chunk, with one connection held while it streams."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(queries.LEDGER_COLUMNS)
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=CHUNK).execute(queries.ledger_select(f))
        for partition in result.partitions():
            for row in partition:
                writer.writerow([_cell(v) for v in row])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
