"""One self-contained HTML page: sections of tables, notes and figures, the figures embedded as base64 PNG
data URIs.

No script, no external stylesheet, font or image: the file opens offline, in any browser, and can be
attached to an issue or mailed as it is. Every text that reaches the page is escaped here, so a run
label or a class name cannot break the markup.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

__all__ = ["Section", "figure", "note", "page", "png_data_uri", "side_by_side", "table"]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #222; background: #fff; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin: 0.3em 0; font-size: 1.05em; }
nav a { margin-right: 1em; }
.intro, .note { color: #555; max-width: 60em; }
.note { font-style: italic; }
.runs { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.run { flex: 1 1 420px; min-width: 320px; }
figure { margin: 0.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.wide { overflow-x: auto; }
"""


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...``: the image travels inside the page."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("png_data_uri takes PNG bytes")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, alt: str, caption: str = "") -> str:
    """An embedded PNG with its alternative text and an optional caption under it."""
    text = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_data_uri(png)}" alt="{escape(alt)}">{text}</figure>'


def note(text: str) -> str:
    """A short sentence in place of what a run cannot show (and why)."""
    return f'<p class="note">{escape(text)}</p>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], groups: Sequence[tuple[str, int]] = ()) -> str:
    """A table; ``groups`` (label, number of columns) adds a first header row spanning column groups
    (the first column, the row names, is left of every group)."""
    head = ""
    if groups:
        cells = "".join(f'<th colspan="{span}">{escape(label)}</th>' for label, span in groups)
        head += f"<tr><th></th>{cells}</tr>"
    head += "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><thead>{head}</thead><tbody>{body}</tbody></table></div>'


def side_by_side(runs: Sequence[tuple[str, Sequence[str]]]) -> str:
    """One column per run (wrapping on a narrow window): its label over its blocks."""
    columns = "".join(f'<div class="run"><h3>{escape(label)}</h3>{"".join(blocks)}</div>' for label, blocks in runs)
    return f'<div class="runs">{columns}</div>'


@dataclass
class Section:
    """One ``<section>`` of the page: ``id`` (its anchor), a title, an intro sentence and HTML blocks."""

    id: str
    title: str
    intro: str = ""
    blocks: list[str] = field(default_factory=list)

    def html(self) -> str:
        intro = f'<p class="intro">{escape(self.intro)}</p>' if self.intro else ""
        return f'<section id="{escape(self.id)}"><h2>{escape(self.title)}</h2>{intro}{"".join(self.blocks)}</section>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: a title, a table of contents and the sections."""
    nav = "".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in sections)
    body = "".join(s.html() for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f'<body><h1>{escape(title)}</h1><p class="intro">{escape(subtitle)}</p><nav>{nav}</nav>{body}</body></html>\n'
    )
