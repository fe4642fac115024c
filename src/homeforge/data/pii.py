"""PII desensitisation: find personal data and replace it, counting by type.

Built-in types (``TYPES``): URLs with credentials, e-mail addresses, PRC resident ID numbers
(GB 11643, mod 11-2 checksum), unified social credit codes (GB 32100, mod 31 checksum),
bank cards (issuer prefix, length and Luhn; any Luhn-valid number after ``卡号``/``card
no.``), bank account numbers after ``账号``/``开户行``/``account no.``, mainland mobiles and
landlines (area code; ``+86`` kept inside the placeholder), international E.164 numbers,
PRC passports, Hong Kong/Macau and Taiwan travel permits, mainland licence plates (new-energy
plates included), public IPv4/IPv6 addresses, and personal names and addresses in labelled
fields (``姓名：``, ``住址：``, ``Name:``, ``Address:``), plus user regexes and a user list of
names or terms. How values are bounded and validated: ``pii_rules``.

Replacement is a typed placeholder (``<EMAIL>``) or a keyed pseudonym
(``<EMAIL_3f9a0c21d4>``): HMAC-SHA256 of the value under a secret, so the same value maps
to the same token across the corpus (phone and card numbers by their digits, whatever the
spacing) and cannot be reversed without the secret. Only counts leave this module; the
values themselves are never logged or reported.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import re
from collections import Counter
from collections.abc import Callable

from homeforge.data import pii_rules as r
from homeforge.data.pii_rules import luhn_ok, valid_cn_id, valid_uscc  # noqa: F401 - public helpers

TYPES = ("URL_CREDENTIALS", "EMAIL", "CN_ID", "CN_USCC", "BANK_CARD", "BANK_ACCOUNT", "CN_MOBILE", "CN_LANDLINE",
         "PHONE", "PASSPORT", "HKMO_PERMIT", "TW_PERMIT", "CN_PLATE", "IPV4", "IPV6", "NAME", "ADDRESS")
PHONE_VALIDATORS = ("phonenumbers", "rules")

_G = r._LETTERS
HAN = r.HAN


def _lead(cls: str, plus: bool = False) -> str:
    """``cls`` as the first character of a value, with the left boundary checked after it (fast: the
    regex engine can skip to candidate characters, which it cannot do behind a leading lookbehind)."""
    glue = f"0-9{_G}+" if plus else f"0-9{_G}"
    return f"{cls}(?<![{glue}]{cls})(?<![0-9]\\.{cls})"


R, RA = r.R, r.RA
_SEP = "[ -]"
_MOBILE_PREFIX = (rf"(?:\+(?<![0-9{_G}+]\+)|00(?<![0-9{_G}]00))86{_SEP}?|[(（](?<![0-9{_G}][(（])\+?86[)）]{_SEP}?|"
                  rf"86-(?<![0-9{_G}]86-)")
_MOBILE_BODY = rf"[3-9]\d{_SEP}?\d{{4}}{_SEP}?\d{{4}}"
_MOBILE = rf"(?:{_MOBILE_PREFIX})1{_MOBILE_BODY}|{_lead('1', plus=True)}{_MOBILE_BODY}"
_AREA = r"0(?:10|2\d|[3-9]\d\d)"
_LOCAL = rf"[2-8]\d{{2,3}}{_SEP}?\d{{4}}"
_GAP = r"[\"']?[ \t]*[:：#=]?[ \t]*[\"']?(?:为|是)?[ \t]*"  # label, then : or = and quotes (JSON, code)
_PHONE_CTX = r"(?:电话|座机|固话|传真|总机|热线|联系方式|[Tt]el\.?|TEL|[Pp]hone|PHONE|[Ff]ax|FAX)(?:号码)?" + _GAP
_ACCOUNT_CTX = (r"(?:账\s*号|帐\s*号|账户|帐户|银行账号|收款账号|付款账号|开户行(?:及账号)?|户号|"
                r"[Aa]ccount[\s_]*(?:[Nn]o\.?|[Nn]umber|#)|ACCOUNT\s*(?:NO\.?|NUMBER)|[Aa]cct\.?\s*(?:[Nn]o\.?|#)?|A/C(?:\s*[Nn]o\.?)?)")
_BANK_NAME = rf"(?:[{HAN}]{{2,20}}?(?:银行|分行|支行|信用社|营业部)[ \t:：,，]*)?"
_CARD_CTX = r"(?:卡号|银行卡号?|信用卡号?|借记卡号?|储蓄卡号?|[Cc]ard\s*(?:[Nn]o\.?|[Nn]umber|#)|CARD\s*(?:NO\.?|NUMBER))"
_PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼使领"
_PL = "A-HJ-NP-Z"  # plate letters: no I or O
_NAME_LABELS_ZH = ("姓\\s*名|名\\s*字|联系人|收件人|收货人|寄件人|户\\s*名|开户名|账户名|持卡人|监护人|法定代表人|法人代表|"
                   "申请人|被保险人|投保人|紧急联系人|家属|签\\s*名|经办人|负责人|患者|病人|就诊人|客户|户主")
_ADDR_LABEL_ZH = "(?:家庭|现|户籍|居住|通讯|通信|联系|收货|寄件|收件|单位|工作单位|注册|经营|常住|详细)?(?:住址|地址|住所)"
_EN_NAME_LABELS = ("full name", "full_name", "fullname", "patient name", "patient_name", "name", "patient",
                   "contact", "contact person", "contact_person", "contact name", "contact_name", "account holder",
                   "account name", "cardholder", "card holder", "beneficiary")
_EN_ADDR_LABELS = ("address", "home address", "home_address", "mailing address", "postal address",
                   "street address", "residential address")
_EN_WORD = r"[A-Z](?:[a-z]+|['’][A-Z][a-z]+)(?:-[A-Z]?[a-z]+)?"
_EN_NAME = rf"(?:(?:Mr|Mrs|Ms|Dr)\.? )?{_EN_WORD}(?: (?:[A-Z]\. )?{_EN_WORD}){{1,3}}|[A-Z]{{2,}} {_EN_WORD}(?: {_EN_WORD})?"

# ----------------------------------------------------------------------------- checks on a match
# A check gets the match and returns the (start, end) to replace, or None to leave the text alone.

Check = Callable[[re.Match], "tuple[int, int] | None"]


def _value(check: Callable[[str], bool] | None = None) -> Check:
    def run(m: re.Match) -> tuple[int, int] | None:
        g = "v" if "v" in m.re.groupindex else 0
        return m.span(g) if check is None or check(m.group(g)) else None
    return run


_VERSION_CTX = re.compile(r"(?:(?<![A-Za-z])(?:[Vv]ersion|[Vv]er\.?|[Rr]elease|GCC|gcc|[Pp]ython|[Bb]uild|[Rr]ev|v)|版本|"
                          r"[=<>~!]=|[A-Za-z]/)\s*$")
_IP_CTX = re.compile(r"(?:\bIP|\bip|[Aa]ddr(?:ess)?|地址|[Hh]ost|服务器|[Ss]erver|inet|[Ff]rom|[Cc]lient)\W{0,3}$")


def _ipv4(m: re.Match) -> tuple[int, int] | None:
    v = m.group("v")
    if not r.valid_ipv4(v):
        return None
    before = m.string[max(0, m.start() - 16): m.start()]
    if _VERSION_CTX.search(before):
        return None
    if all(len(o) == 1 for o in v.split(".")) and not _IP_CTX.search(before):
        return None  # 2.7.2.2 reads as a version unless the text says it is an address
    return m.span("v")


def _landline(check: Callable[[str], bool]) -> Check:
    """Validate the number without its extension; replace both."""
    def run(m: re.Match) -> tuple[int, int] | None:
        return m.span("v") if check(m.group("m")) else None
    return run


def _name_zh(strict: bool) -> Check:
    def run(m: re.Match) -> tuple[int, int] | None:
        s = m.start("v")
        v = r.cut_at_next_field(m.group("v"), 2)
        if strict and not m.group(0).startswith("姓名") and v[0] in "于自无有为因经在及和与的已未不仍再又曾均予行今次等":
            return None
        if strict and len(v) == len(m.group("v")) and m.end("v") < len(m.string) and "\u4e00" <= m.string[m.end("v")] <= "\u9fff":
            return None
        return (s, s + len(v)) if r.chinese_name_ok(v, strict) else None
    return run


def _address_zh(m: re.Match) -> tuple[int, int] | None:
    s = m.start("v")
    v = r.cut_at_next_field(m.group("v"), 4).rstrip(" \t")
    return (s, s + len(v)) if r.address_ok(v) else None


def _label_before(m: re.Match, labels: tuple[str, ...]) -> str | None:
    """The label (one of ``labels``) that ends right before the ``:``/``=`` matched at ``m``, if any."""
    before = m.string[max(0, m.start() - 22): m.start()].rstrip(" \t\"'").lower()
    for lab in labels:
        if before.endswith(lab) and not (len(before) > len(lab) and before[-len(lab) - 1].isalnum()):
            return lab
    return None


def _labelled(labels: tuple[str, ...], value: re.Pattern, value_ok: Callable[[str], bool]) -> Check:
    """English/JSON/code fields: the match is the ``:``/``=``; the label before it is checked first (cheap),
    then ``value`` is matched after it (groups v, v1, v2 or v3 hold the value)."""
    def run(m: re.Match) -> tuple[int, int] | None:
        if _label_before(m, labels) is None:
            return None
        mv = value.match(m.string, m.end())
        if mv is None:
            return None
        g = next(g for g in ("v", "v1", "v2", "v3") if g in value.groupindex and mv.group(g) is not None)
        return mv.span(g) if value_ok(mv.group(g)) else None
    return run


_PERSON_LABELS = tuple(lab for lab in _EN_NAME_LABELS if lab != "name")
_NAME_VALUE = re.compile(rf"[ \t]*[\"']?(?P<v>{_EN_NAME}|[{HAN}]{{2,4}}(?![{HAN}]))")
_ADDRESS_VALUE = re.compile(r"[ \t]*(?:\"(?P<v1>[^\n\"<>]{5,100}?)\"|'(?P<v2>[^\n'<>]{5,100}?)'|"
                            r"(?P<v3>[^\n;\"<>]{5,100}?)(?=[\n;]|\. |\.$|$))")
_person_label = _labelled(_PERSON_LABELS, _NAME_VALUE, lambda v: True)
_generic_name = _labelled(("name",), _NAME_VALUE, lambda v: r.chinese_name_ok(v, strict=True))


def _en_name(m: re.Match) -> tuple[int, int] | None:
    """``Name: John Smith`` in a form; in code and JSON (``name=``, ``"name":``) the generic key names
    things (``Movie(name='The Birds')``), so there only a Chinese personal name counts."""
    code = m.group(0) == "=" or m.string[max(0, m.start() - 4): m.start()].rstrip(" \t").endswith(("'", '"'))
    if not code:
        return _labelled(_EN_NAME_LABELS, _NAME_VALUE, lambda v: True)(m)
    return _person_label(m) or _generic_name(m)


def _en_address_value(v: str) -> bool:
    if v[:1] >= "\u3400":
        return r.address_ok(v)
    return r.english_address_ok(v)


def _plate(m: re.Match) -> tuple[int, int] | None:
    s = m.group("s") or m.group("s4")
    if len(s) == 6:
        nev = (s[0] in "ABCDEFGHJK" and s[2:].isdigit()) or (s[:5].isdigit() and s[5] in "ABCDEFGHJK")
        return m.span("v") if nev else None
    return m.span("v") if sum(c.isalpha() for c in s) <= 2 else None


# ----------------------------------------------------------------------------- the detectors
# (type, regex, check, guard) in priority order: where spans overlap, the earlier detector wins.
# Guards are cheap tests on the whole text; a detector only runs when its guard passes.

_NUM = "num"  # the text has a run of 6 digits or a digit group (see _GUARD_RX)


def _detectors(phone: str) -> list[tuple[str, str, Check, str | None]]:
    pn = phone == "phonenumbers"
    mobile = r.valid_mobile_pn if pn else r.valid_mobile_rules
    landline = r.valid_landline_pn if pn else r.valid_landline_rules
    intl = r.valid_phone_pn if pn else r.valid_phone_rules
    return [
        ("URL_CREDENTIALS", rf"(?P<v>[A-Za-z](?<![A-Za-z0-9+.-][A-Za-z])[A-Za-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@"
                            rf"[^\s/?#<>\"',{HAN}\u3000-\u303f\uff00-\uffef]+(?:[^\s<>\"',{HAN}\u3000-\u303f\uff00-\uffef]*[^\s<>\"'.,;:!?)\]{HAN}\u3000-\u303f\uff00-\uffef])?)",
         _value(r.valid_url_credentials), "://"),
        ("EMAIL", r"(?P<v>[A-Za-z0-9._%+-](?<![A-Za-z0-9._%+-][A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@[A-Za-z0-9-]+"
                  r"(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})(?![A-Za-z0-9-])", _value(r.valid_email), "@"),
        ("CN_USCC", rf"(?P<v>{_lead('[1-9A-HNY]')}[1-9]\d{{6}}[0-9A-HJ-NP-RTUW-Y]{{10}}){RA}", _value(r.valid_uscc), _NUM),
        ("CN_ID", rf"(?P<v>{_lead('[1-8]')}\d{{5}} ?(?:18|19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]) ?\d{{3}}[\dXx]){R}",
         _value(valid_cn_id), _NUM),
        ("BANK_CARD", rf"{_CARD_CTX}{_GAP}(?P<v>\d(?:[ -]?\d){{11,18}}){R}",
         _value(lambda s: r.valid_card(s, context=True)), _NUM),
        ("BANK_ACCOUNT", rf"{_ACCOUNT_CTX}{_GAP}{_BANK_NAME}(?P<v>\d(?:[ -]?\d){{7,29}}){R}",
         _value(), _NUM),
        ("BANK_CARD", rf"(?P<v>{_lead('[2-6]')}\d{{3}}(?:[ -]\d{{4}}){{2,3}}(?:[ -]\d{{1,4}})?|{_lead('3')}\d{{3}}[ -]\d{{6}}[ -]\d{{5}}|"
                      rf"{_lead('[2-68]')}\d{{12,18}}){R}", _value(r.valid_card), _NUM),
        ("CN_MOBILE", rf"(?P<v>{_MOBILE}){R}", _value(mobile), _NUM),
        ("CN_LANDLINE", rf"(?P<v>(?P<m>(?:[(（](?<![0-9{_G}+][(（]){_AREA}[)）][ -]?|0(?<![0-9{_G}+]0)(?<![0-9]\.0)(?:10|2\d|[3-9]\d\d)[ -])"
                        rf"{_LOCAL})(?:(?:-|转|ext\.? ?|x)\d{{1,5}})?){R}", _landline(landline), _NUM),
        ("CN_LANDLINE", rf"(?P<v>(?:\+(?<![0-9{_G}+]\+)|00(?<![0-9{_G}]00))86[ -]?(?:\(0\)[ -]?)?(?:10|2\d|[3-9]\d\d)[ -]?{_LOCAL}){R}",
         _value(landline), _NUM),
        ("CN_LANDLINE", rf"{_PHONE_CTX}(?P<v>{_AREA}[2-8]\d{{6,7}}){R}", _value(landline), _NUM),
        ("CN_LANDLINE", rf"{_PHONE_CTX}(?P<v>[2-8]\d{{2,3}}[ -]?\d{{4}}){R}", _value(r.valid_local_landline), _NUM),
        ("PHONE", rf"(?P<v>\+(?<![0-9{_G}+]\+)[1-9]\d{{0,3}}(?:[ -]?\(?\d{{1,5}}\)?){{1,6}}){R}", _value(intl), _NUM),
        ("PASSPORT", rf"(?P<v>{_lead('[EG]')}\d{{8}}|{_lead('E')}[{_PL}]\d{{7}}|{_lead('[DSP]')}E\d{{7}}){RA}", _value(), _NUM),
        ("PASSPORT", rf"(?:护照(?:号码|号)?|[Pp]assport(?:\s*(?:[Nn]o\.?|[Nn]umber|#))?|PASSPORT(?:\s*NO\.?)?)"
                     rf"{_GAP}(?P<v>[A-Z]{{1,2}}\d{{6,9}}){RA}", _value(), _NUM),
        ("HKMO_PERMIT", rf"(?P<v>{_lead('C')}[0-9{_PL}]\d{{7}}|{_lead('W')}\d{{8}}|{_lead('[HM]')}\d{{8}}(?:\d\d)?){RA}", _value(), _NUM),
        ("TW_PERMIT", rf"(?P<v>{_lead('L')}\d{{8}}){RA}", _value(), _NUM),
        ("TW_PERMIT", rf"(?:台胞证|台湾居民来往大陆通行证|台湾通行证|MTP)(?:号码|号)?"
                      rf"{_GAP}(?P<v>\d{{8}}(?:\d\d)?(?:[(（][A-Z][)）])?|[A-Z]\d{{7,9}}){RA}", _value(), _NUM),
        ("CN_PLATE", rf"(?P<v>[{_PROVINCES}][{_PL}][·• -]?(?:(?P<s>[0-9{_PL}]{{5,6}})|(?P<s4>[0-9{_PL}]{{4}})[挂学警港澳领]))"
                     rf"{RA}", _plate, "plate"),
        ("IPV4", rf"(?P<v>[0-9](?:(?<=[Ii][Pp][0-9])|(?<![0-9{_G}.][0-9]))\d{{0,2}}\.\d{{1,3}}\.\d{{1,3}}\.\d{{1,3}})"
                 rf"(?![0-9{_G}])(?!\.[0-9A-Za-z])(?!/)", _ipv4, "ipv4"),
        ("IPV6", r"(?P<v>(?:[0-9A-Fa-f](?:(?<=[Ii][Pp][0-9A-Fa-f])|(?<![0-9A-Za-z_.][0-9A-Fa-f]))(?<![0-9A-Fa-f:]:[0-9A-Fa-f])|::(?<![0-9A-Za-z_:.]::))[0-9A-Fa-f:]*:[0-9A-Fa-f]*:[0-9A-Fa-f:]*"
                 r"(?:\d{1,3}(?:\.\d{1,3}){3})?)(?![0-9A-Za-z_:%/])(?!\.\d)", _value(r.valid_ipv6), "ipv6"),
        ("ADDRESS", rf"{_ADDR_LABEL_ZH}[\"']?[ \t]*(?:[:：]|为|是)?[ \t]*[\"']?(?P<v>[^\n\t,;:。，；：、|\"'<>]{{5,80}})", _address_zh, "addr"),
        ("ADDRESS", r"[:=：]", _labelled(_EN_ADDR_LABELS, _ADDRESS_VALUE, _en_address_value), "ddress"),
        ("NAME", rf"(?:{_NAME_LABELS_ZH})[\"']?[ \t]*[:：][ \t]*[\"']?(?P<v>[{HAN}·•]{{2,12}})", _name_zh(False), "name"),
        ("NAME", rf"(?:患者|病人|联系人|收件人|收货人|就诊人|户主|客户|姓名|持卡人|申请人)(?P<v>[{HAN}]{{2,8}})", _name_zh(True), "name"),
        ("NAME", r"[:=：]", _en_name, "ame"),
    ]


# Detectors whose values sit next to a seed that is cheap to find run only in windows around the seeds
# (most text has none, or a few): (seed, characters kept before it, after it). The window reaches far
# enough back for the longest label (``开户行：中国工商银行北京分行 账号：``) and forward for the value.
_SEEDS = {_NUM: (re.compile(r"\d\d(?:\d[ -]?\d\d\d|[ -]\d\d[ -]\d\d)"), 56, 24),
          "@": (re.compile("@"), 80, 260), "://": (re.compile("://"), 40, 400),
          "ipv4": (re.compile(r"\d\.\d{1,3}\.\d"), 16, 16),
          "ipv6": (re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]"), 44, 44)}
# the other detectors run on the whole text when their guard finds a label
_GUARD_RX = {"plate": re.compile(f"[{_PROVINCES}][{_PL}]"), "addr": re.compile("住址|地址|住所"),
             "name": re.compile(f"{_NAME_LABELS_ZH}|姓名")}
_GUARD_SUBSTR = {"ddress": ("ddress", "DDRESS"), "ame": ("ame", "AME", "atient", "ontact", "older", "eneficiary")}


def _regions(guard: str | None, text: str, memo: dict) -> list:
    """Where a detector must look: the whole text, windows around its seeds, or nowhere."""
    if guard is None:
        return [(0, len(text))]
    if guard not in memo:
        if guard in _SEEDS:
            seed, left, right = _SEEDS[guard]
            wins: list[list[int]] = []
            for m in seed.finditer(text):
                s, e = max(0, m.start() - left), min(len(text), m.end() + right)
                if wins and s <= wins[-1][1]:
                    wins[-1][1] = max(wins[-1][1], e)
                else:
                    wins.append([s, e])
            memo[guard] = wins
        elif guard in _GUARD_RX:
            memo[guard] = [(0, len(text))] if _GUARD_RX[guard].search(text) else []
        else:
            memo[guard] = [(0, len(text))] if any(x in text for x in _GUARD_SUBSTR[guard]) else []
    return memo[guard]


_CANON_DIGITS = {"CN_ID", "CN_USCC", "BANK_CARD", "BANK_ACCOUNT", "CN_LANDLINE", "PHONE", "PASSPORT", "HKMO_PERMIT",
                 "TW_PERMIT"}


def _canonical(kind: str, value: str) -> str:
    """The value a pseudonym is keyed on: the same number written differently gets the same token."""
    value = r.fold(value)
    if kind == "CN_MOBILE":
        return "".join(c for c in value if c.isdigit())[-11:]
    if kind in _CANON_DIGITS:
        return "".join(c for c in value.upper() if c.isalnum())
    if kind == "EMAIL":
        return value.lower()
    return value.strip()


class Scrubber:
    """Replace PII in text; ``scrub`` returns (new_text, Counter of types found).

    ``phone``: ``"rules"`` (default) validates phone numbers with our rules (MIIT mobile blocks, area
    codes and local lengths, ITU country codes and E.164 lengths); ``"phonenumbers"`` with Google's
    numbering-plan data (the ``phonenumbers`` package; measured in docs/data.md, not better here).
    """

    def __init__(self, types: list[str] | None = None, mode: str = "placeholder", secret: bytes | None = None,
                 patterns: dict[str, str] | None = None, terms: list[str] | None = None, terms_type: str = "NAME",
                 phone: str = "rules"):
        if mode == "pseudonym" and not secret:
            raise ValueError("pseudonym mode needs a secret")
        unknown = sorted(set(types or ()) - set(TYPES))
        if unknown:
            raise ValueError(f"unknown PII type(s) {unknown}; built-in types: {', '.join(TYPES)}")
        if phone not in PHONE_VALIDATORS:
            raise ValueError(f"phone validation {phone!r}; allowed: {', '.join(PHONE_VALIDATORS)}")
        if phone == "phonenumbers":
            import phonenumbers  # noqa: F401 - fail here, not on the first number
        self.mode, self.secret, self.phone = mode, secret or b"", phone
        wanted = set(types if types is not None else TYPES)
        self.detectors: list[tuple[str, re.Pattern, Check, str | None]] = [
            (name, re.compile(rx), check, guard) for name, rx, check, guard in _detectors(phone) if name in wanted]
        for name, rx in (patterns or {}).items():
            self.detectors.append((name.upper(), re.compile(rx), _value(), None))
        terms = sorted({t.strip() for t in terms or [] if t.strip()}, key=len, reverse=True)
        if terms:
            alts = []
            for t in terms:
                e = re.escape(t)
                # letter boundaries only make sense for terms written in a spaced script
                alts.append(rf"(?<![0-9{_G}]){e}(?![0-9{_G}])" if t.isascii() else e)
            self.detectors.append((terms_type, re.compile("|".join(alts)), _value(), None))

    def token(self, kind: str, value: str) -> str:
        if self.mode == "placeholder":
            return f"<{kind}>"
        digest = hmac.new(self.secret, f"{kind}\0{_canonical(kind, value)}".encode(), hashlib.sha256).hexdigest()[:10]
        return f"<{kind}_{digest}>"

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, type) spans; earlier detectors win."""
        folded = r.fold(text)
        n = len(folded)
        spans: list[tuple[int, int, str]] = []  # sorted by start, never overlapping
        memo: dict = {}
        for kind, rx, check, guard in self.detectors:
            for ws, we in _regions(guard, folded, memo):
                for m in rx.finditer(folded, ws, we):
                    if m.end() == we < n:  # cut by the window's end: match again with the text after it
                        m = rx.match(folded, m.start())
                        if m is None:
                            continue
                    span = check(m)
                    if span is None or span[0] == span[1]:
                        continue
                    s, e = span
                    i = bisect.bisect_left(spans, (s,))
                    if (i == 0 or spans[i - 1][1] <= s) and (i == len(spans) or e <= spans[i][0]):
                        spans.insert(i, (s, e, kind))
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
