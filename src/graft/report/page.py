"""The report page's parts: figures formatted as the page shows them, tables, cards, escaping,
and the inline CSS and JS (nothing on the page is fetched from anywhere)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from html import escape
from typing import Any


SHARES = ("old_taken_by_new", "new_taken_by_old", "old_predictions_kept", "old_detections_unchanged")


def format_metric(key: str, value: Any, *, forgetting_is_share: bool = True) -> str:
    """A figure as the page shows it: accuracies and shares as percentages (``93.9%``), mAP, AP
    and a detector's forgetting with three decimals (``0.766``); ``n/a`` when there is none."""
    if value is None:
        return "n/a"
    if "accuracy" in key or key in SHARES or (key == "forgetting" and forgetting_is_share):
        return pct(value)
    return f"{value:.3f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def esc(value: Any) -> str:
    return escape(str(value))


def tag(name: str, body: str, **attrs: Any) -> str:
    attr = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return f"<{name}{attr}>{body}</{name}>"


def figure(key: str, value: Any, label: str, *, forgetting_is_share: bool, prefix: str = "") -> str:
    """A headline figure; ``data-metric`` names its key so a test can compare it with the JSON."""
    text = format_metric(key, value, forgetting_is_share=forgetting_is_share)
    return tag("div", tag("div", esc(label), class_="label") + tag("div", esc(text), class_="value", data_metric=prefix + key), class_="card")


def table(headers: list[tuple[str, str]], rows: Iterable[list[tuple[str, Any]]], *, sortable: bool = False) -> str:
    """``headers``: (title, "num" or "text"); each row's cells: (shown text, sort key or None)."""
    head = "".join(tag("th", esc(title), data_type=kind, title="click to sort" if sortable else None) for title, kind in headers)
    kinds = [kind for _, kind in headers]
    body = "".join("<tr>" + "".join(tag("td", esc(text), data_sort=key, class_="num" if kind == "num" else None) for (text, key), kind in zip(row, kinds)) + "</tr>" for row in rows)
    return tag("table", f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>", class_="sortable" if sortable else None)


def pairs(items: list[tuple[str, Any]]) -> str:
    """A definition list of the items whose value is not None."""
    return tag("dl", "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v is not None and v != ""))


def img(uri: str | None, alt: str) -> str:
    return "" if uri is None else f'<img src="{uri}" alt="{esc(alt)}">'


def cell(value: Any, show: Callable[[Any], str] = lambda v: f"{v:.3f}") -> tuple[str, Any]:
    """A numeric table cell: its text, and the number it sorts by ("" for none: sorts first)."""
    return ("n/a", "") if value is None else (show(value), value)


def name_list(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2327;background:#f6f7f9;line-height:1.45}
header{background:#fff;border-bottom:1px solid #dde1e6;padding:16px 28px}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.2em;margin:0 0 12px}h3{font-size:1em;margin:18px 0 8px}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none;font-size:.92em}
main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:16px 20px;margin:16px 0}
.note{color:#5c6670;font-size:.9em;margin:4px 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:14px}
.card{border:1px solid #dde1e6;border-radius:6px;padding:10px 16px;min-width:130px;background:#fafbfc}
.card .label{font-size:.85em;color:#5c6670}.card .value{font-size:1.6em;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0 0 14px}
dt{color:#5c6670}dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.92em}
th,td{border-bottom:1px solid #e6e9ed;padding:4px 12px;text-align:left;overflow-wrap:anywhere}
th{background:#f0f2f5}td.num,th[data-type=num]{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e2e7ee}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
img{max-width:100%;height:auto;display:block;margin:6px 0}
pre{font-size:.82em;max-height:300px;overflow:auto;background:#f6f7f9;padding:8px}
"""


JS = """
for (const th of document.querySelectorAll("table.sortable th")) {
  th.tabIndex = 0;
  th.addEventListener("click", () => sortBy(th));
  th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(th); });
}
function sortBy(th) {
  const body = th.closest("table").tBodies[0], i = th.cellIndex, num = th.dataset.type === "num";
  const up = th.getAttribute("aria-sort") !== "ascending";
  for (const other of th.parentNode.children) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", up ? "ascending" : "descending");
  const key = (tr) => {
    const v = tr.cells[i].dataset.sort ?? tr.cells[i].textContent;
    return num ? (v === "" || isNaN(v) ? -Infinity : Number(v)) : v;
  };
  const rows = Array.from(body.rows).map((tr) => [key(tr), tr]);
  rows.sort((a, b) => (num ? (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0) : a[0].localeCompare(b[0])) * (up ? 1 : -1));
  for (const [, tr] of rows) body.appendChild(tr);
}
"""
