"""Values from outside (payloads, paths, names, messages) made safe to print: shown as they are, never obeyed.

A terminal obeys control characters (ESC starts a sequence that can recolour, move the cursor or retitle the
window), bidirectional overrides reorder what is shown, and line breaks or tabs split a table's rows; Rich also
reads ``[...]`` as markup. ``visible`` spells each such character as an escape (``\\x1b``, ``\\t``, ``\\u202e``),
and ``text`` wraps the result in a Rich ``Text``, which Rich prints without reading markup or emoji codes.
"""

from __future__ import annotations

import re

from rich.text import Text

# C0 and C1 controls and DEL, the bidi marks, embeddings, overrides and isolates, the line and paragraph
# separators, and lone surrogates (a file name's undecodable bytes, which no UTF-8 stream can write).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte the file name held
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(value: object) -> str:
    """``str(value)`` on one line, with every character a terminal would act on spelled out as an escape."""
    return _UNSAFE.sub(_escape, str(value))


def text(value: object, style: str = "") -> Text:
    """``visible(value)`` as a Rich renderable: brackets stay brackets, ``:name:`` stays text."""
    return Text(visible(value), style=style)
