"""The report page: one HTML file with inline CSS and images as data URIs.

Nothing is loaded from elsewhere (no scripts, fonts or style sheets), so the file opens offline, can
be mailed or archived, and renders the same everywhere. Every text passed in is escaped here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; background: #ffffff;
       margin: 0; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 21px; margin: 40px 0 8px; padding-top: 12px; border-top: 1px solid #d8d8de; }
h3 { font-size: 16px; margin: 24px 0 6px; }
.sub { color: #5f5f66; margin: 0 0 16px; }
nav ul { padding-left: 20px; margin: 4px 0; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border-bottom: 1px solid #e3e3e8; padding: 4px 12px 4px 0; text-align: left; vertical-align: top; }
td:first-child { white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #5f5f66; font-size: 13px; margin-top: 4px; }
.missing { color: #8a5a00; background: #fff7e6; border-left: 3px solid #e0a000; padding: 4px 10px; margin: 6px 0;
           font-size: 14px; }
code { font-size: 13px; background: #f3f3f6; padding: 1px 4px; border-radius: 3px; }
"""


@dataclass
class Section:
    id: str
    title: str
    blocks: list[str] = field(default_factory=list)   # HTML fragments made by the functions below


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def bullets(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def heading(text: str) -> str:
    return f"<h3>{escape(text)}</h3>"


def missing(text: str) -> str:
    """A line saying what was not found, where its plot or table would have been."""
    return f'<p class="missing">{escape(text)}</p>'


def figure(uri: str, caption: str, alt: str) -> str:
    return f'<figure><img src="{escape(uri)}" alt="{escape(alt)}"><figcaption>{escape(caption)}</figcaption></figure>'


def table(headers: list[str], rows: list[list], numeric: set[int] | frozenset = frozenset()) -> str:
    """Columns whose index is in ``numeric`` are right-aligned."""
    def cells(values, tag):
        return "".join(f'<{tag}{" class=num" if i in numeric else ""}>{escape(str(v))}</{tag}>'
                       for i, v in enumerate(values))
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><thead><tr>{cells(headers, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, subtitle: str, sections: list[Section]) -> str:
    toc = "".join(f'<li><a href="#{escape(s.id)}">{escape(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{escape(s.id)}"><h2>{escape(s.title)}</h2>{"".join(s.blocks)}</section>'
                   for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f'<body><main><h1>{escape(title)}</h1><p class="sub">{escape(subtitle)}</p>'
            f"<nav><ul>{toc}</ul></nav>{body}</main></body></html>\n")
