"""CSV exports for oversight reports (bureaus open them in Excel).

UTF-8 with a BOM (without it Excel shows Chinese as mojibake), CRLF line ends
(RFC 4180), and cells a spreadsheet would run as a formula neutralised with a
leading apostrophe (CSV injection: an institution's or a school's name is
user input).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any, Final

from fastapi.responses import Response

BOM: Final = "\ufeff"
MEDIA_TYPE: Final = "text/csv; charset=utf-8"
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")

#: `responses=` of a route that answers CSV, for the OpenAPI document.
CSV_OPENAPI: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {"text/csv": {}}, "description": "UTF-8（带 BOM）CSV"}
}


def cell(value: Any) -> Any:
    """One CSV cell: None is empty, booleans are 1/0, lists are joined, text a
    spreadsheet would run as a formula gets a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    if isinstance(value, list | tuple):
        return "；".join(str(v) for v in value)
    return value


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The CSV text: BOM, header row, one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows([cell(v) for v in row] for row in rows)
    return BOM + buffer.getvalue()


def render_dicts(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """`render` of mappings, taking `columns` from each (missing keys empty)."""
    return render(columns, ([row.get(c) for c in columns] for row in rows))


def csv_response(filename: str, text: str) -> Response:
    """An attachment named `<filename>.csv`."""
    return Response(
        content=text.encode("utf-8"),
        media_type=MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'},
    )
