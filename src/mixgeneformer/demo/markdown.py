"""Text of the demo report: shell words, Markdown cells that hold any label, and the report's HTML.

Cell-type labels and gene names come from the user's data, so every one that enters the report
goes through :func:`md_text` (one line, Markdown's special characters escaped) and every one that
enters a command through :func:`shell_word`. :func:`markdown_to_html` reads exactly the Markdown
the report writes, escapes included.
"""

from __future__ import annotations

import html
import re
import shlex

import pandas as pd

#: characters a label could use to start Markdown emphasis (``*``, ``_``), strikethrough (``~``),
#: code, links, HTML or an entity (``&amp;`` would show as ``&``); ``|`` is replaced
_MD_SPECIAL = re.compile(r"([\\`*_~&<>\[\]])")
#: a backslash escape of :data:`_MD_SPECIAL` in report text
_MD_ESCAPE = re.compile(r"\\([\\`*_~&<>\[\]])")


def shell_word(value: object) -> str:
    """``value`` as one shell word (quoted when needed)."""
    return shlex.quote(str(value))


def md_text(value: object) -> str:
    """``value`` as inline Markdown text: on one line, ``|`` as ``/`` (ortholog tokens are
    ``HUMAN|mouse``; a pipe would split a table cell) and Markdown's special characters escaped."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(value)).replace("|", "/")
    return _MD_SPECIAL.sub(r"\\\1", text)


def frame_markdown(frame: pd.DataFrame) -> str:
    """A Markdown table of ``frame`` (floats to 3 significant digits, every cell through :func:`md_text`)."""

    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else md_text(value)

    header = "| " + " | ".join(map(md_text, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _inline(text: str) -> str:
    """HTML of a line's inline Markdown: `code`, **strong** and the escapes of :func:`md_text`."""
    parts = _MD_ESCAPE.split(text)  # plain text and escaped characters, alternating
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(html.escape(part))
            continue
        part = html.escape(part)
        part = re.sub(r"`([^`]+)`", r"<code>\1</code>", part)
        out.append(re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", part))
    return "".join(out)


# long: one pass over the lines, a branch per block kind the report writes (code, heading, table, image, list, paragraph)
def markdown_to_html(markdown: str, title: str) -> str:
    """A small converter for the subset of Markdown the report uses (headings, tables, images,
    code blocks, lists, paragraphs), so no extra dependency is needed."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(html.escape(lines[i]))
                i += 1
            out.append("<pre><code>" + "\n".join(block) + "</code></pre>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            i -= 1
            body = rows[2:] if len(rows) > 1 else []
            out.append(
                "<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</tbody></table>"
            )
        elif (match := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line)) is not None:
            out.append(f'<p><img src="{html.escape(match.group(2))}" alt="{html.escape(match.group(1))}" style="max-width:100%"></p>')
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            i -= 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}"
        "pre{background:#f5f5f5;padding:8px;overflow-x:auto}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )
