"""Text cleaning and quality filters that work on unspaced Chinese as well as English.

``normalize`` fixes the text (Unicode normalisation, control characters and ANSI colour
codes, HTML remnants, optional URL removal, whitespace). ``check`` returns why a text
should be dropped (a ``Drop``: reason key, the measured value and the limit it broke)
or ``None`` to keep it. Every threshold is in ``config.CleanConfig``; 0 or null switches
a filter off.

Language awareness (see docs/data.md, "Chinese and other CJK text"):

- the default normalisation ``NFKC_CJK`` is NFKC except for full-width punctuation and
  signs (，：？（）！；￥ ...), the ideographic space and the ellipsis, which are kept as
  typed; full-width letters and digits (１３８, ＡＢＣ) still fold to ASCII, which the PII
  detectors and the tokenizer want;
- lengths are measured in characters where a CJK character counts ``cjk_char_weight``
  characters (one Hanzi carries about as much as three or four Latin letters);
- punctuation of running prose (CJK and full-width punctuation, curly quotes, dashes,
  the ellipsis, the middle dot) is text, not "symbols";
- words are spaced words plus one word per CJK character, and repetition is measured
  on character n-grams (``cjk_ngram``) when most words are CJK characters, on word
  3-grams otherwise.

Measurements never build a Python object per character, and repetition looks at the
first ``REPETITION_WINDOW`` words, so one huge record costs a few copies of its text,
not gigabytes.
"""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
from typing import NamedTuple

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# HTML elements (WHATWG list, plus a few obsolete ones still met in old pages)
_HTML_ELEMENTS = (
    "a abbr address area article aside audio b base bdi bdo blockquote body br button canvas caption center cite code "
    "col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption figure font footer form "
    "frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe img input ins kbd label legend li link main map "
    "mark menu meta meter nav noscript object ol optgroup option output p param picture pre progress q rp rt ruby s samp "
    "script search section select slot small source span strike strong style sub summary sup table tbody td template "
    "textarea tfoot th thead time title tr track tt u ul var video wbr").split()
# a tag is a known element name with well-formed attributes (name, name=value, name="v"), not any "<word ... >"
# span: shell here-documents (cat >f <<EOF ... EOF), C++ templates (vector<int>), #include <stdio.h> survive
_TAG = re.compile(r"</?(?i:" + "|".join(sorted(_HTML_ELEMENTS, key=len, reverse=True)) + r")"
                  r"(?:\s+[A-Za-z_:][-\w:.]*(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?)*\s*/?>|<!--.*?-->", re.S)
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z]{2,8});")
_URL = re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+\.\S+")
_SPACES = re.compile(r" [ \t\u00a0]+|[\t\u00a0][ \t\u00a0]*")  # not single spaces: re.sub keeps a piece per match
_IDEOGRAPHIC_SPACES = re.compile(r"\u3000+")
_BLANK_LINES = re.compile(r"\n{3,}")

# Han (with extensions and compatibility ideographs), kana (without the ・ middle dot), Hangul
CJK_CHARS = ("\u3040-\u30fa\u30fc-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
             "\U00020000-\U0002fa1f")
_CJK = re.compile(f"[{CJK_CHARS}]")
_WORD = re.compile(f"[{CJK_CHARS}]|[^\\W{CJK_CHARS}]+")


def _ranges(chars: list[str]) -> str:
    """A regex character class body for ``chars`` (sorted code points -> runs)."""
    out, cps = [], sorted(ord(c) for c in chars)
    for _, run in itertools.groupby(enumerate(cps), key=lambda t: t[1] - t[0]):
        run = [cp for _, cp in run]
        out.append(re.escape(chr(run[0])) if len(run) == 1 else f"{re.escape(chr(run[0]))}-{re.escape(chr(run[-1]))}")
    return "".join(out)


def _block(lo: int, hi: int, pred) -> list[str]:
    return [chr(cp) for cp in range(lo, hi + 1) if pred(unicodedata.category(chr(cp)))]


# punctuation of running prose: CJK symbols and punctuation, vertical and small forms,
# full-width punctuation, general punctuation (curly quotes, dashes, ellipsis), middle dots
PROSE_PUNCT = _ranges(_block(0x3000, 0x303F, lambda c: c.startswith("P")) + _block(0xFE10, 0xFE1F, lambda c: c.startswith("P"))
                      + _block(0xFE30, 0xFE4F, lambda c: c.startswith("P")) + _block(0xFF01, 0xFF65, lambda c: c.startswith("P"))
                      + _block(0x2010, 0x2027, lambda c: c.startswith("P")) + ["\u00b7", "\u30fb"])
_SYMBOL = re.compile(f"[^\\w\\s{PROSE_PUNCT}]|_")
_DIGIT = re.compile(r"\d")

# kept as typed by NFKC_CJK: full-width punctuation and signs (not letters or digits),
# the ideographic space, the two-dot and three-dot ellipses
_KEEP = re.compile("[" + _ranges(_block(0xFF01, 0xFF60, lambda c: not c.startswith(("L", "N")))
                                 + _block(0xFFE0, 0xFFEE, lambda c: True) + ["\u3000", "\u2025", "\u2026"]) + "]")
_NOT_KEEP = re.compile(_KEEP.pattern.replace("[", "[^", 1) + "+")

REPETITION_WINDOW = 100_000  # words looked at by the n-gram repetition filter


def nfkc_cjk(text: str) -> str:
    """NFKC, except full-width punctuation/signs, the ideographic space and ellipses (kept byte for byte)."""
    if not _KEEP.search(text):
        return unicodedata.normalize("NFKC", text)
    return _NOT_KEEP.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)


def normalize(text: str, cfg) -> str:
    form = cfg.unicode_form
    if form == "NFKC_CJK":
        text = nfkc_cjk(text)
    elif form:
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control:
        text = _CTRL.sub("", _ANSI.sub("", text))
    if cfg.strip_html and ("<" in text or "&" in text):
        text = _TAG.sub(" ", text)
        if _ENTITY.search(text):
            text = html.unescape(text)
    if cfg.remove_urls:
        text = _URL.sub("", text)
    if cfg.collapse_whitespace:
        text = _IDEOGRAPHIC_SPACES.sub("\u3000", _SPACES.sub(" ", text))
        text = "\n".join(line.strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


LONG = 1 << 16  # texts longer than this are measured in slices of this size


def last_match(rx: re.Pattern, text: str, lo: int, hi: int) -> re.Match | None:
    """The last match of ``rx`` in ``text[lo:hi]`` (positions absolute), or None."""
    found = None
    for found in rx.finditer(text, lo, hi):  # noqa: B007 - only the last one is wanted
        pass
    return found


def _count(rx: re.Pattern, text: str) -> int:
    """Matches of a one-character pattern, without a Python object per match (slice by slice)."""
    if len(text) <= LONG:
        return len(text) - len(rx.sub("", text))
    return sum(_count(rx, text[i:i + LONG]) for i in range(0, len(text), LONG))


def cjk_count(text: str) -> int:
    return _count(_CJK, text)


def cjk_fraction(text: str) -> float:
    return cjk_count(text) / len(text) if text else 0.0


def weighted_length(text: str, cjk_weight: float = 1.0) -> float:
    """Characters, a CJK character counting ``cjk_weight``."""
    return len(text) + (cjk_weight - 1) * cjk_count(text) if cjk_weight != 1 else float(len(text))


def words(text: str, limit: int | None = None) -> list[str]:
    """Spaced words, and one word per CJK character (the first ``limit`` only, if given)."""
    if limit is None:
        return _WORD.findall(text)
    return [m.group() for m in itertools.islice(_WORD.finditer(text), limit)]


def symbol_fraction(text: str) -> float:
    return _count(_SYMBOL, text) / len(text) if text else 0.0


def top_ngram_coverage(ws: list[str], n: int) -> tuple[float, int]:
    """(fraction of words covered by the most frequent n-gram's occurrences, its count)."""
    if len(ws) < n:
        return 0.0, 0
    grams: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(ws) - n + 1):
        grams.setdefault(tuple(ws[i:i + n]), []).append(i)
    starts = max(grams.values(), key=len)
    covered, end = 0, -1
    for s in starts:  # union of the occurrences' spans (overlaps counted once)
        covered += min(n, s + n - max(s, end))
        end = s + n
    return covered / len(ws), len(starts)


class Drop(NamedTuple):
    reason: str
    value: float | int | None = None
    limit: float | int | None = None
    what: str = ""

    def detail(self) -> str:
        if self.value is None:
            return self.what or self.reason.replace("_", " ")
        op = "<" if self.reason in ("too_short", "too_few_words") else ">"
        v = f"{self.value:.2f}" if isinstance(self.value, float) else f"{self.value:,}"
        lim = f"{self.limit:.2f}" if isinstance(self.limit, float) else f"{self.limit:,}"
        return f"{self.what or self.reason.replace('_', ' ')} {v} {op} {lim}"


def check(text: str, cfg) -> Drop | None:
    """Why this text fails the filters (a ``Drop``), or None to keep it."""
    n = len(text)
    if n == 0:
        return Drop("empty")
    w = cfg.cjk_char_weight
    if cfg.min_chars:
        length = weighted_length(text, w)
        if length < cfg.min_chars:
            value = int(length) if length == int(length) else round(length, 2)
            return Drop("too_short", value, cfg.min_chars, f"length (CJK characters count {w:g})" if length != n else "length")
    if cfg.max_chars and n > cfg.max_chars:
        return Drop("too_long", n, cfg.max_chars, "characters")
    if cfg.min_words:
        nw = len(words(text, cfg.min_words))
        if nw < cfg.min_words:
            return Drop("too_few_words", nw, cfg.min_words, "words")
    if cfg.max_symbol_ratio:
        r = symbol_fraction(text)
        if r > cfg.max_symbol_ratio:
            return Drop("symbol_ratio", round(r, 4), cfg.max_symbol_ratio, "symbol ratio")
    if cfg.max_digit_ratio:
        r = _count(_DIGIT, text) / n
        if r > cfg.max_digit_ratio:
            return Drop("digit_ratio", round(r, 4), cfg.max_digit_ratio, "digit ratio")
    lines = None
    if cfg.max_dup_line_fraction:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) >= 4:
            r = 1 - len(set(lines)) / len(lines)
            if r > cfg.max_dup_line_fraction:
                return Drop("repeated_lines", round(r, 4), cfg.max_dup_line_fraction, "repeated line fraction")
    if cfg.max_top_ngram_fraction:
        ws = words(text, REPETITION_WINDOW)
        if len(ws) >= 20:
            cjk_words = sum(1 for x in ws if len(x) == 1 and _CJK.match(x))
            ng = cfg.cjk_ngram if cjk_words * 2 > len(ws) else 3
            cov, top = top_ngram_coverage(ws, ng)
            if top > 2 and cov > cfg.max_top_ngram_fraction:
                unit = "character" if ng == cfg.cjk_ngram and cjk_words * 2 > len(ws) else "word"
                return Drop("repeated_ngrams", round(cov, 4), cfg.max_top_ngram_fraction,
                            f"coverage of the top {unit} {ng}-gram")
    if cfg.max_short_line_fraction:
        lines = lines if lines is not None else [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) >= 5:
            short = sum(1 for ln in lines if weighted_length(ln, w) < cfg.short_line_chars)
            r = short / len(lines)
            if r > cfg.max_short_line_fraction:
                return Drop("short_lines", round(r, 4), cfg.max_short_line_fraction, "short line fraction")
    return None


def quality_reason(text: str, cfg) -> str | None:
    """The reason key of ``check``, or None to keep the text."""
    d = check(text, cfg)
    return d.reason if d else None
