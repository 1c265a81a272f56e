"""Small HTML pieces of the audit report: figures marked up for checking, tables, code."""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

from cloudexit.core.units import format_bytes, format_duration


class _Html(str):
    """Markup that `tr` must not escape."""


def _n(value: Any) -> str:
    v = int(value or 0)
    return f'<span class="n" data-v="{v}">{v:,}</span>'


def _b(value: Any) -> str:
    v = int(value or 0)
    return f'<span class="n" data-v="{v}" title="{v:,} bytes">{escape(format_bytes(v))}</span>'


def _d(seconds: Any) -> str:
    if seconds is None:
        return "-"
    v = float(seconds)
    return f'<span class="n" data-v="{round(v)}">{escape(format_duration(v))}</span>'


def _money(value: Any) -> str:
    if value is None:
        return "-"
    return f'<span class="n" data-v="{float(value):.2f}">{float(value):,.2f}</span>'


def _t(text: Any) -> str:
    """An ISO timestamp shown as `YYYY-MM-DD HH:MM:SS UTC`."""
    if not text:
        return "-"
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return escape(str(text))
    return f'<time datetime="{escape(str(text))}">{moment.strftime("%Y-%m-%d %H:%M:%S")}' \
           f'{" UTC" if moment.utcoffset() is not None and not moment.utcoffset() else ""}</time>'


def _table(head: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    if head is None:  # a key / value table: the first column names the row
        body = "".join("<tr>" + "".join((f"<th>{c}</th>" if i == 0 else f"<td>{c}</td>")
                                        for i, c in enumerate(row)) + "</tr>" for row in rows)
        return f'<table class="kv {cls}"><tbody>{body}</tbody></table>'
    h = "".join(f"<th>{c}</th>" for c in head)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _td(cell: str) -> str:
    """A cell; right-aligned when it holds a figure."""
    bare = cell.removeprefix("<strong>")
    if bare.startswith('<span class="n"'):
        return f'<td class="num">{cell}</td>'
    return f"<td>{cell}</td>"


def _code(text: Any) -> str:
    return f"<code>{escape(str(text))}</code>" if text not in (None, "") else "-"


def _inline_md(text: str) -> str:
    """`code` spans in translated text (already escaped)."""
    parts = escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _css_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
