"""Which option did a free-text answer choose? Robust option-letter extraction.

Video LLMs rarely answer a multiple-choice question with a bare letter: "(B) the man opens the
door", "The answer is C.", "I think it's option b because ...", "It is moving left." (the option's
text without its letter), "A red circle is moving right." (an ARTICLE "A", not option A).
:func:`extract_option` reads such replies in a fixed order of evidence, strongest first:

1. a letter at the very start in option form: ``"B"``, ``"(B)"``, ``"B."``, ``"B)"``, ``"B:"``,
   ``"b) ..."`` (after a ``"Best option:("`` cue the reply starts right after the parenthesis,
   so the cue is put back in front first), but not ``"A red ..."`` (an article);
2. an explicit statement: "answer is (C)", "Answer: C", "option c", "choice (D)", "the best
   option is B";
3. a parenthesised letter anywhere ``"(C)"`` or a ``"C."``/``"C)"`` list marker;
4. the option's text: the normalised reply equals one option, or contains exactly one option's
   text as whole words (the longest wins when one option's text contains another's);
5. nothing found: ``None`` -- or, with ``fallback="random"``, an option drawn from a hash of the
   sample id (so a model that never answers scores near chance, reproducibly; the record says
   how the letter was found).

Only letters of existing options count (a 4-option question ignores "E").
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def letter(index: int) -> str:
    return LETTERS[index]


def index_of(option_letter: str) -> int:
    return LETTERS.index(option_letter.upper())


@dataclass
class Choice:
    """The extraction result: the chosen letter (None if nothing was found) and how."""

    letter: Optional[str]
    how: str  # "letter", "statement", "marker", "text", "fallback", "none"


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _strip_option_prefix(option: str) -> str:
    """'A. red' / '(A) red' / 'A) red' -> 'red' (Video-MME options carry their letters)."""
    m = re.match(r"^\s*\(?[A-Z]\s*[.):]\s*", option)
    return option[m.end():] if m else option


def extract_option(text: str, options: Sequence[str], *, prefix: str = "", fallback: Optional[str] = None,
                   key: str = "") -> Choice:
    """The option a reply chose.

    Args:
        text: the model's reply (raw, as generated).
        options: the option texts, in letter order (with or without their "A." prefixes).
        prefix: a cue the prompt ended with and the reply continues (e.g. ``"("`` of
            ``"Best option:("``); it is put back before parsing.
        fallback: ``None`` (no letter when nothing is found) or ``"random"`` (a letter drawn from
            ``crc32(key)``: reproducible across runs, processes and the lmms-eval plugin).
        key: the sample id used by the random fallback.
    """
    n = len(options)
    if n == 0:
        return Choice(None, "none")
    valid = LETTERS[:n]
    reply = (prefix + (text or "")).strip()

    # 1. a letter at the start, in option form (not an article: "A red circle")
    m = re.match(r"^[\s\"'*]*(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?=\s*(?:[.):,]|$))|([a-z])(?=\s*[.):]))", reply)
    if m:
        got = (m.group(1) or m.group(2) or m.group(3)).upper()
        if got in valid:
            return Choice(got, "letter")
    # 2. an explicit statement
    for m in re.finditer(r"\b(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:\-]?\s*"
                         r"(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?![A-Za-z])|([a-z])(?=\s*(?:[.,;:!)]|$)))",
                         reply):
        got = (m.group(1) or m.group(2) or m.group(3) or "").upper()
        if got in valid:
            return Choice(got, "statement")
    # 3. a parenthesised letter anywhere, or a list marker "C." / "C)" not at a sentence's end
    found = [g.upper() for g in re.findall(r"\(\s*([A-Z])\s*\)", reply) if g.upper() in valid]
    if not found:
        found = [g for g in re.findall(r"(?<![A-Za-z])([A-Z])[.)](?=\s+\S|$)", reply) if g in valid]
    if len(set(found)) == 1:
        return Choice(found[0], "marker")
    # 4. the option's text
    norm = _words(reply)
    texts = [_words(_strip_option_prefix(o)) for o in options]
    for i, t in enumerate(texts):
        if t and norm == t:
            return Choice(valid[i], "text")
    hits = [i for i, t in enumerate(texts) if t and re.search(r"(?<![a-z0-9])" + re.escape(t) + r"(?![a-z0-9])", norm)]
    if len(hits) == 1:
        return Choice(valid[hits[0]], "text")
    if len(hits) > 1:
        longest = max(hits, key=lambda i: len(texts[i]))
        if all(texts[i] in texts[longest] for i in hits):
            return Choice(valid[longest], "text")
    # 5. nothing
    if fallback == "random":
        return Choice(valid[zlib.crc32(key.encode("utf-8")) % n], "fallback")
    if fallback not in (None, "none"):
        raise ValueError(f"fallback={fallback!r}: expected None or 'random'")
    return Choice(None, "none")


__all__ = ["Choice", "LETTERS", "extract_option", "index_of", "letter"]
