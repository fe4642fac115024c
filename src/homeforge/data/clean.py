"""Text cleaning and quality filters.

``normalize`` fixes the text (Unicode NFKC, control characters, HTML remnants, optional
URL removal, whitespace). ``quality_reason`` returns why a text should be dropped (a short
reason key counted in the report) or ``None`` to keep it. Every threshold is in
``config.CleanConfig``; a value of 0/None switches a filter off.
"""

from __future__ import annotations

import html
import re
import unicodedata

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s+[^<>]*)?/?>|<!--.*?-->", re.S)
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z]{2,8});")
_URL = re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+\.\S+")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"\w+", re.U)
_SYMBOL = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")


def normalize(text: str, cfg) -> str:
    if cfg.unicode_form:
        text = unicodedata.normalize(cfg.unicode_form, text)
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
        text = _SPACES.sub(" ", text)
        text = "\n".join(line.strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def cjk_fraction(text: str) -> float:
    if not text:
        return 0.0
    return len(_CJK.findall(text)) / len(text)


def words(text: str) -> list[str]:
    """Words for a spaced script; one 'word' per character for CJK text."""
    if cjk_fraction(text) > 0.3:
        return [c for c in text if not c.isspace()]
    return _WORD.findall(text)


def quality_reason(text: str, cfg) -> str | None:
    """Why this text fails the filters (a reason key), or None to keep it."""
    n = len(text)
    if n == 0:
        return "empty"
    if cfg.min_chars and n < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and n > cfg.max_chars:
        return "too_long"
    ws = words(text)
    if cfg.min_words and len(ws) < cfg.min_words:
        return "too_few_words"
    if cfg.max_symbol_ratio is not None:
        if len(_SYMBOL.findall(text)) / n > cfg.max_symbol_ratio:
            return "symbol_ratio"
    if cfg.max_digit_ratio is not None:
        if len(_DIGIT.findall(text)) / n > cfg.max_digit_ratio:
            return "digit_ratio"
    if cfg.max_dup_line_fraction is not None:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) >= 4 and 1 - len(set(lines)) / len(lines) > cfg.max_dup_line_fraction:
            return "repeated_lines"
    if cfg.max_top_ngram_fraction is not None and len(ws) >= 20:
        grams: dict[tuple[str, str, str], int] = {}
        for g in zip(ws, ws[1:], ws[2:], strict=False):
            grams[g] = grams.get(g, 0) + 1
        top = max(grams.values())
        if top > 2 and top * 3 / len(ws) > cfg.max_top_ngram_fraction:
            return "repeated_ngrams"
    if cfg.max_short_line_fraction is not None:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) >= 5:
            short = sum(1 for ln in lines if len(ln) < cfg.short_line_chars)
            if short / len(lines) > cfg.max_short_line_fraction:
                return "short_lines"
    return None
