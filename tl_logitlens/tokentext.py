"""Token text as it should appear in a figure: every character visible, nothing interpreted.

A decoded token is often mostly whitespace (``" the"``, ``"\\n"``, ``"    "``), and
matplotlib reads ``$...$`` as mathtext (and, with ``text.usetex``, hands ``_``, ``\\``,
``^``, ``{``, ``}`` to LaTeX). :func:`display_token` makes the invisible visible, and
:data:`LITERAL_TEXT` is the keyword set that every token-bearing matplotlib ``Text``
is drawn with, so that what appears is exactly ``display_token(decoded)``, character for
character. Both are pure (no matplotlib import here).

Glyphs (all present in DejaVu Sans, matplotlib's default font):

====================================  ==========================================
in the token                          shown as
====================================  ==========================================
leading / trailing space ``" "``      ``␣`` (U+2423), one per space
leading / trailing no-break space     ``⍽`` (U+237D)
newline ``"\\n"``                     ``⏎`` (U+23CE), anywhere in the token
tab ``"\\t"``                         ``⇥`` (U+21E5), anywhere in the token
carriage return ``"\\r"``             ``\\r`` (backslash, r)
other control characters              ``\\xNN`` / ``\\uNNNN`` escapes
the empty string                      ``∅`` (U+2205)
``$ _ \\ ^ { }`` and everything else  unchanged (drawn with ``parse_math=False``)
====================================  ==========================================

Spaces inside a token (``"New York"`` from a word-level tokenizer) stay ordinary spaces.

Example::

    >>> from tl_logitlens.tokentext import display_token
    >>> display_token(" the"), display_token("\\n\\n"), display_token("$x$")
    ('␣the', '⏎⏎', '$x$')
"""

from __future__ import annotations

from typing import Dict

__all__ = ["LITERAL_TEXT", "SPACE", "NBSP", "NEWLINE", "TAB", "EMPTY", "display_token"]

SPACE = "\u2423"  # ␣ open box
NBSP = "\u237d"  # ⍽ shouldered open box
NEWLINE = "\u23ce"  # ⏎ return symbol
TAB = "\u21e5"  # ⇥ rightwards arrow to bar
EMPTY = "\u2205"  # ∅ empty set

#: Keyword arguments for every matplotlib ``Text`` that shows token (or label) text:
#: no mathtext parsing of ``$...$`` and no LaTeX even when ``rcParams["text.usetex"]`` is on,
#: so ``$``, ``_``, ``\\``, ``^``, ``{``, ``}`` are drawn as themselves.
LITERAL_TEXT: Dict[str, bool] = {"parse_math": False, "usetex": False}

_INNER = {"\n": NEWLINE, "\t": TAB, "\r": "\\r"}


def _char(ch: str) -> str:
    if ch in _INNER:
        return _INNER[ch]
    code = ord(ch)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if code in (0x2028, 0x2029, 0x85, 0xFEFF) or 0x200B <= code <= 0x200F:
        # Line/paragraph separators, zero-width and direction marks: invisible or layout-breaking.
        return f"\\u{code:04x}"
    return ch


def display_token(text: str) -> str:
    """Render one decoded token so that every character is visible and nothing is markup.

    Leading and trailing spaces become ``␣`` (no-break spaces ``⍽``), newlines ``⏎``
    and tabs ``⇥`` wherever they are, other control characters ``\\xNN`` escapes, and
    the empty string ``∅``. All other characters, including ``$ _ \\ ^ { }``, are kept
    as they are: draw the result with :data:`LITERAL_TEXT` (``parse_math=False,
    usetex=False``) so matplotlib shows them literally.

    Args:
        text: the token as the tokenizer decodes it (``tokenizer.decode([id])``).

    Returns:
        A one-line string, ``len >= 1``.

    Example::

        >>> from tl_logitlens.tokentext import display_token
        >>> [display_token(t) for t in [" the", "\\n", "\\t\\tif", "a_b", "\\\\alpha", "", "  "]]
        ['␣the', '⏎', '⇥⇥if', 'a_b', '\\\\alpha', '∅', '␣␣']
    """
    if not isinstance(text, str):
        raise TypeError(f"display_token needs a str (a decoded token), got {type(text).__name__}")
    if text == "":
        return EMPTY
    start = len(text) - len(text.lstrip(" \u00a0"))
    stop = len(text.rstrip(" \u00a0"))
    if start >= stop:  # only spaces
        head, body, tail = text, "", ""
    else:
        head, body, tail = text[:start], text[start:stop], text[stop:]
    visible = {" ": SPACE, "\u00a0": NBSP}
    return (
        "".join(visible[c] for c in head)
        + "".join(_char(c) for c in body)
        + "".join(visible[c] for c in tail)
    )
