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

from typing import Any, Dict, Optional

__all__ = ["LITERAL_TEXT", "SPACE", "NBSP", "NEWLINE", "TAB", "EMPTY", "WORD_START", "display_token", "token_text"]

SPACE = "\u2423"  # ␣ open box
NBSP = "\u237d"  # ⍽ shouldered open box
NEWLINE = "\u23ce"  # ⏎ return symbol
TAB = "\u21e5"  # ⇥ rightwards arrow to bar
EMPTY = "\u2205"  # ∅ empty set
WORD_START = "\u2581"  # ▁ sentencepiece's own word-start marker

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
    return "".join(visible[c] for c in head) + "".join(_char(c) for c in body) + "".join(visible[c] for c in tail)


def _piece(tokenizer: Any, token_id: int) -> Optional[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return None
    try:
        piece = convert(int(token_id))
    except Exception:  # an id the tokenizer does not know: the caller falls back to the id
        return None
    return piece if isinstance(piece, str) else None


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token as the vocabulary spells it, word boundaries kept, never empty.

    ``tokenizer.decode([id])`` loses what a single token means: a sentencepiece
    tokenizer strips the word-start marker (``"▁a"`` decodes to ``"a"``, the bare ``"▁"``
    to ``""``) and byte pieces decode to ``"\ufffd"``. So:

    - a piece that holds sentencepiece's ``▁`` (U+2581) or is a byte piece (``<0x0A>``)
      is returned as the vocabulary spells it: ``▁`` is the visible word-start marker;
    - any other token (byte-level BPE such as GPT-2, word-level vocabularies) is its
      decoded text, with a leading space as a real space (``" the"``; draw it with
      :func:`display_token` to see ``␣the``);
    - a token that would still be empty is written by its id, ``⟨410⟩``.

    Every string this returns is accepted back by the package's token arguments
    (``answers=``, ``targets=``), so a token copied from ``top_tokens()`` or a CSV names
    the same id. Without a tokenizer, ``#id``.

    Args:
        tokenizer: a Hugging Face tokenizer, or ``None``.
        token_id: one vocabulary id.

    Returns:
        A non-empty string.

    Example::

        >>> import tl_logitlens as tll
        >>> from tl_logitlens.tokentext import token_text
        >>> model = tll.demo_model()
        >>> token_text(model.tokenizer, int(model.to_tokens("cat", prepend_bos=False)[0, 0]))
        'cat'
        >>> token_text(None, 7)
        '#7'
    """
    token_id = int(token_id)
    if tokenizer is None:
        return f"#{token_id}"
    piece = _piece(tokenizer, token_id)
    if piece is not None and (WORD_START in piece or _is_byte_piece(piece)):
        return piece
    try:
        text = tokenizer.decode([token_id])
    except Exception:  # an id past the tokenizer's table (a padded vocabulary)
        text = ""
    if "\ufffd" in text and piece:
        return piece
    if text == "" and piece:
        text = piece
    return text if text != "" else f"\u27e8{token_id}\u27e9"


def _is_byte_piece(piece: str) -> bool:
    """``<0x0A>``: sentencepiece's byte-fallback spelling."""
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
