"""PII desensitisation: find personal data and replace it, counting by type.

Detectors (``TYPES``): URLs with credentials, e-mail addresses, PRC resident ID numbers
(18 digits, ISO 7064 mod 11-2 checksum), bank card numbers (13-19 digits, Luhn),
mainland China mobile and landline numbers, international E.164 numbers, IPv4 and IPv6
addresses (validated with ``ipaddress``), plus user regexes and a user list of names or
terms. Checksum-validated detectors never fire on numbers that fail their checksum.

Replacement is a typed placeholder (``<EMAIL>``) or a keyed pseudonym
(``<EMAIL_3f9a0c21d4>``): HMAC-SHA256 of the value under a secret, so the same value maps
to the same token across the corpus and cannot be reversed without the secret. Only
counts leave this module; the values themselves are never logged or reported.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Callable

TYPES = ("URL_CREDENTIALS", "EMAIL", "CN_ID", "BANK_CARD", "CN_MOBILE", "CN_LANDLINE", "PHONE", "IPV4", "IPV6")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_cn_id(s: str) -> bool:
    """PRC resident ID (GB 11643-1999): 17 digits + check character (ISO 7064 mod 11-2)."""
    s = s.upper()
    if len(s) != 18 or not s[:17].isdigit() or s[0] == "0":
        return False
    month, day = int(s[10:12]), int(s[12:14])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=False))
    return _ID_CHECK[total % 11] == s[17]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _valid_card(s: str) -> bool:
    digits = re.sub(r"[ -]", "", s)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def _valid_ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _valid_ipv6(s: str) -> bool:
    if s.count(":") < 2 or sum(c not in ":." for c in s) < 4:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


_ND = r"(?<![\w.+-])"  # not glued to a preceding word, digit, dot or sign
_NE = r"(?![\w])"
# (type, regex, validator) in priority order: earlier matches win where spans overlap.
_DETECTORS: list[tuple[str, str, Callable[[str], bool] | None]] = [
    ("URL_CREDENTIALS", r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s/?#]+[^\s]*", None),
    ("EMAIL", r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", None),
    ("CN_ID", r"(?<![\w])\d{17}[\dXx](?![\w])", valid_cn_id),
    ("BANK_CARD", r"(?<![\w-])(?:\d{4}[ -]){3}\d{1,7}(?![\w-])|(?<![\w])\d{13,19}(?![\w])", _valid_card),
    ("CN_MOBILE", r"(?<![\w+])(?:(?:\+|00)86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?![\w])", None),
    ("CN_LANDLINE", r"(?<![\w])(?:\(0\d{2,3}\)[ -]?|0\d{2,3}-)\d{7,8}(?:-\d{1,5})?(?![\w])", None),
    ("PHONE", r"(?<![\w+])\+[1-9]\d{0,2}(?:[ -]?\(?\d{1,4}\)?){2,5}(?![\w])", None),
    ("IPV4", r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)", _valid_ipv4),
    ("IPV6", r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])", _valid_ipv6),
]


# cheap guards: a detector runs only when its text could match (most documents have no PII)
_GUARDS = {"URL_CREDENTIALS": lambda t, d: "://" in t, "EMAIL": lambda t, d: "@" in t,
           "IPV6": lambda t, d: "::" in t or (d and t.count(":") >= 2), "IPV4": lambda t, d: d and "." in t}
_DIGIT_TYPES = {"CN_ID", "BANK_CARD", "CN_MOBILE", "CN_LANDLINE", "PHONE"}
_HAS_DIGIT = re.compile(r"\d")


def _phone_len_ok(s: str) -> bool:
    n = sum(c.isdigit() for c in s)
    return 8 <= n <= 15


class Scrubber:
    """Replace PII in text; ``scrub`` returns (new_text, Counter of types found)."""

    def __init__(self, types: list[str] | None = None, mode: str = "placeholder", secret: bytes | None = None,
                 patterns: dict[str, str] | None = None, terms: list[str] | None = None, terms_type: str = "NAME"):
        if mode == "pseudonym" and not secret:
            raise ValueError("pseudonym mode needs a secret")
        self.mode = mode
        self.secret = secret or b""
        wanted = set(types if types is not None else TYPES)
        self.detectors: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = []
        for name, rx, check in _DETECTORS:
            if name in wanted:
                if name == "PHONE":
                    check = _phone_len_ok
                self.detectors.append((name, re.compile(rx), check))
        for name, rx in (patterns or {}).items():
            self.detectors.append((name.upper(), re.compile(rx), None))
        terms = sorted({t.strip() for t in terms or [] if t.strip()}, key=len, reverse=True)
        if terms:
            alts = []
            for t in terms:
                e = re.escape(t)
                # word boundaries only make sense for terms written in a spaced script
                alts.append(rf"(?<!\w){e}(?!\w)" if t.isascii() else e)
            self.detectors.append((terms_type, re.compile("|".join(alts)), None))

    def token(self, kind: str, value: str) -> str:
        if self.mode == "placeholder":
            return f"<{kind}>"
        digest = hmac.new(self.secret, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:10]
        return f"<{kind}_{digest}>"

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, type) spans; earlier detectors win."""
        spans: list[tuple[int, int, str]] = []
        taken: list[tuple[int, int]] = []
        digits = _HAS_DIGIT.search(text) is not None
        for kind, rx, check in self.detectors:
            guard = _GUARDS.get(kind)
            if (guard is not None and not guard(text, digits)) or (kind in _DIGIT_TYPES and not digits):
                continue
            for m in rx.finditer(text):
                s, e = m.span()
                if s == e or (check is not None and not check(m.group())):
                    continue
                if any(s < te and ts < e for ts, te in taken):
                    continue
                spans.append((s, e, kind))
                taken.append((s, e))
        spans.sort()
        return spans

    def scrub(self, text: str) -> tuple[str, Counter]:
        spans = self.find(text)
        counts: Counter = Counter()
        if not spans:
            return text, counts
        out, pos = [], 0
        for s, e, kind in spans:
            out.append(text[pos:s])
            out.append(self.token(kind, text[s:e]))
            counts[kind] += 1
            pos = e
        out.append(text[pos:])
        return "".join(out), counts
