"""How the admin commands print: tables sized to their content, counts with their nouns, ages and times."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def print_table(headers: list[str], rows: list[list[Any]], width: int | None = None) -> None:
    """Columns sized to their content; the last one cut to fit `width` (the terminal)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    if width is not None:
        widths[-1] = max(20, min(widths[-1], width - sum(w + 2 for w in widths[:-1])))
    numeric = [all(_is_number(row[i]) for row in cells) for i in range(len(headers))]
    for row in [headers, *cells]:
        out = []
        for i, cell in enumerate(row):
            if i == len(row) - 1 and len(cell) > widths[i]:
                cell = cell[: widths[i] - 1] + "…"
            out.append(cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]))
        print("  ".join(out).rstrip())


def _is_number(cell: str) -> bool:
    return cell.lstrip("-").isdigit() or cell == "-"


def footer(shown: int, total: int, noun: str) -> None:
    print(plural(total, noun) if shown == total else f"showing {shown:,} of {plural(total, noun)} (--limit N for more)")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def utc(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def jsonable(row) -> dict[str, Any]:
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()}
