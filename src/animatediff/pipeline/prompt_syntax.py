"""A1111's prompt attention syntax: which parts of a prompt carry which weight.

    (word)        x1.1, nesting multiplies: ((word)) x1.21
    [word]        /1.1
    (word:1.2)    x1.2 (an explicit weight, spaces allowed around the number)
    \\( \\) \\[ \\] \\\\  the literal character
    BREAK         (capitals, a word of its own) ends the current 75-token chunk

Unbalanced brackets behave as in AUTOMATIC1111's web UI: a bracket left open applies from where
it opens to the end of the prompt, a closing bracket with nothing open is kept as text, and a
lone backslash is dropped. Adjacent parts of equal weight are merged. One difference: A1111 lets
an enclosing bracket multiply the weight of a BREAK (so "(a BREAK b)" has no break there); here a
BREAK is a break wherever it is.
"""

from __future__ import annotations

import re

from ..options import OptionError

__all__ = ["BREAK", "parse_prompt_attention"]

# The part that stands for BREAK in parse_prompt_attention's result (A1111's convention).
BREAK = ("BREAK", -1.0)
ROUND, SQUARE = 1.1, 1 / 1.1

# One lexical token of a prompt: an escaped bracket or backslash, a lone backslash, an opening
# bracket, a closing round bracket with an explicit weight, a closing bracket, a run of plain
# text, or a colon that is not part of a weight.
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]
    | \\
    | [(\[]
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) parts, A1111's way; a break is the part `BREAK`.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    parts: list[list] = []  # [text, weight, is_break]
    opened: dict[str, list[int]] = {"(": [], "[": []}
    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            parts.append([token[1:], 1.0, False])
        elif token in ("(", "["):
            opened[token].append(len(parts))
        elif weight is not None and opened["("]:
            _scale(parts, opened["("].pop(), _number(weight, text))
        elif token == ")" and opened["("]:
            _scale(parts, opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            _scale(parts, opened["["].pop(), SQUARE)
        else:
            parts.extend(_split_breaks(token))
    # Brackets never closed apply to the end, round ones first (the order A1111 multiplies in).
    for start in opened["("]:
        _scale(parts, start, ROUND)
    for start in opened["["]:
        _scale(parts, start, SQUARE)
    return _merged(parts) or [("", 1.0)]


def _number(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise OptionError(f"prompt: bad attention weight {weight!r} in {text!r}") from None


def _scale(parts: list[list], start: int, factor: float) -> None:
    for part in parts[start:]:
        if not part[2]:
            part[1] *= factor


def _split_breaks(text: str) -> list[list]:
    out: list[list] = []
    for i, piece in enumerate(_BREAK.split(text)):
        if i > 0:
            out.append([*BREAK, True])
        out.append([piece, 1.0, False])
    return out


def _merged(parts: list[list]) -> list[tuple[str, float]]:
    out: list[list] = []
    for part in parts:
        if out and not part[2] and not out[-1][2] and out[-1][1] == part[1]:
            out[-1][0] += part[0]
        else:
            out.append(list(part))
    return [BREAK if is_break else (text, weight) for text, weight, is_break in out]
