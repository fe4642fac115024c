"""The built-in PII detectors: shapes, boundaries, context words and validators.

Boundaries are defined by what a value is made of, not by ``\\w``: a number must not have
a digit, an ASCII (or Latin/Greek/Cyrillic) letter or an underscore glued to it, nor be the
fraction of a decimal (``3.14159265359``); CJK characters and CJK punctuation are valid
boundaries, so ``身份证号110101199003077774，`` is found. Validators decide the type
(checksums, numbering plans, allocated address ranges); context words catch the numbers
that carry no checksum (``账号``, ``护照``, ``电话``...). Detection runs on a copy of the text
where full-width ASCII (``１３８``, ``：``, ``（``) is folded to ASCII, one character for one,
so spans map back to the original unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# ----------------------------------------------------------------------------- boundaries

_LETTERS = "A-Za-z_\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff"  # letters that glue to a value (not CJK)
L = rf"(?<![0-9{_LETTERS}])(?<![0-9]\.)"  # no digit/letter before, not the fraction of a decimal
R = rf"(?![0-9{_LETTERS}])(?!\.[0-9])"  # no digit/letter after, not followed by a fraction
LA = rf"(?<![0-9{_LETTERS}])"  # alphanumeric ids (passports, permits, USCC)
RA = rf"(?![0-9{_LETTERS}])"
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_FW = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}  # full-width ASCII -> ASCII
_FW_RX = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\uff0b\uff20]")  # only values typed full-width trigger it


def fold(text: str) -> str:
    """Full-width ASCII to ASCII, one character for one (offsets are kept), when a full-width digit,
    letter, ``＋`` or ``＠`` is present; labels and separators are matched in both widths anyway."""
    return text.translate(_FW) if _FW_RX.search(text) else text


# ----------------------------------------------------------------------------- validators

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _plausible_date(y: int, m: int, d: int) -> bool:
    return 1800 <= y <= 2099 and 1 <= m <= 12 and 1 <= d <= _DAYS[m - 1]


def id_shaped(s: str) -> bool:
    """18 characters that read as a resident ID (region digit and birth date), checksum aside."""
    return (len(s) == 18 and s[:17].isdigit() and s[0] in "12345678"
            and _plausible_date(int(s[6:10]), int(s[10:12]), int(s[12:14])))


def valid_cn_id(s: str) -> bool:
    """PRC resident ID (GB 11643-1999): region, birth date, sequence, ISO 7064 mod 11-2 check."""
    s = s.upper().replace(" ", "")
    if not id_shaped(s):
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


def _card_issuer_ok(d: str) -> bool:
    """Issuer prefix and length of the card networks (ISO/IEC 7812 IIN ranges)."""
    n, p2, p4 = len(d), int(d[:2]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # Amex
    if p2 in (62, 81):
        return 16 <= n <= 19  # UnionPay (62, 81)
    if 3528 <= p4 <= 3589 or p2 in (36, 38, 39) or 300 <= int(d[:3]) <= 305:
        return 14 <= n <= 19  # JCB, Diners
    return d[0] in "56" and 12 <= n <= 19  # Maestro, Discover, domestic debit


def valid_card(s: str, context: bool = False) -> bool:
    d = s.replace(" ", "").replace("-", "")
    if not (13 <= len(d) <= 19) or len(set(d)) < 3 or not luhn_ok(d) or id_shaped(d):
        return False
    return context or _card_issuer_ok(d)


_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)


_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def _org_code_ok(s: str) -> bool:
    """GB 11714 organisation code (8 characters + check), the 9th-17th characters of a credit code."""
    total = sum(int(c, 36) * w for c, w in zip(s[:8], _ORG_WEIGHTS, strict=True))
    v = 11 - total % 11
    return s[8] == ("X" if v == 10 else "0" if v == 11 else str(v))


def valid_uscc(s: str) -> bool:
    """Unified social credit code (GB 32100-2015): mod 31 check over the 17 body characters, and the
    GB 11714 check of the organisation code inside it. An all-digit code that reads as a resident ID
    (region and birth date) is left to the ID detector."""
    if len(s) != 18 or any(c not in _USCC_CHARS for c in s) or (s.isdigit() and id_shaped(s)):
        return False
    total = sum(_USCC_CHARS.index(c) * w for c, w in zip(s, _USCC_WEIGHTS, strict=False))
    return _USCC_CHARS[(31 - total % 31) % 31] == s[17] and _org_code_ok(s[8:17])


_MOBILE_PREFIX = re.compile(r"1(?:3\d|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8\d|9[0-35-9])")  # MIIT mobile blocks


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _national_mobile(s: str) -> str:
    d = _digits(s)
    return d[-11:]


def valid_mobile_rules(s: str) -> bool:
    d = _digits(s)
    if len(d) > 11 and not (d.startswith("86") or d.startswith("0086")):
        return False
    n = d[-11:]
    return len(n) == 11 and _MOBILE_PREFIX.match(n) is not None and len(set(n[3:])) > 1


_AREA = re.compile(r"0(?:10|2\d|[3-9]\d\d)")  # 010, 02x, 0[3-9]xx


def _landline_parts(s: str) -> tuple[str, str] | None:
    d = _digits(s)
    if d.startswith("0086"):
        d = d[4:]
    elif d.startswith("86") and not s.lstrip("(").startswith("0"):
        d = d[2:]
    if not d.startswith("0"):
        d = "0" + d
    m = _AREA.match(d)
    if m is None:
        return None
    return d[: m.end()], d[m.end():]


def valid_landline_rules(s: str) -> bool:
    parts = _landline_parts(s)
    if parts is None:
        return False
    area, local = parts
    ok_len = len(local) == 8 if len(area) == 3 else len(local) in (7, 8)
    return ok_len and local[0] in "2345678"


def valid_local_landline(s: str) -> bool:
    d = _digits(s)
    return len(d) in (7, 8) and d[0] in "2345678" and len(set(d)) > 1


# ITU-T E.164 country calling codes in use (assigned codes; 1-3 digits)
_CC = set("""1 7 20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 62
63 64 65 66 81 82 84 86 90 91 92 93 94 95 98 211 212 213 216 218 220 221 222 223 224 225 226 227 228
229 230 231 232 233 234 235 236 237 238 239 240 241 242 243 244 245 246 247 248 249 250 251 252 253
254 255 256 257 258 260 261 262 263 264 265 266 267 268 269 290 291 297 298 299 350 351 352 353 354
355 356 357 358 359 370 371 372 373 374 375 376 377 378 379 380 381 382 383 385 386 387 389 420 421
423 500 501 502 503 504 505 506 507 508 509 590 591 592 593 594 595 596 597 598 599 670 672 673 674
675 676 677 678 679 680 681 682 683 685 686 687 688 689 690 691 692 850 852 853 855 856 880 886 960
961 962 963 964 965 966 967 968 970 971 972 973 974 975 976 977 992 993 994 995 996 998""".split())


def valid_phone_rules(s: str) -> bool:
    """A known country code and 9-15 digits (10 when written without any separator: ``+12345678``
    in a ledger is an amount)."""
    d = _digits(s)
    grouped = any(c in " -(" for c in s)
    if not (9 if grouped else 10) <= len(d) <= 15:
        return False
    return any(d[:k] in _CC for k in (1, 2, 3))


def _pn_valid(number: str, region: str | None, kinds: tuple[str, ...] | None) -> bool:
    import phonenumbers

    try:
        n = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException:
        return False
    if not phonenumbers.is_valid_number(n):
        return False
    if kinds is None:
        return True
    t = phonenumbers.number_type(n)
    names = {phonenumbers.PhoneNumberType.MOBILE: "mobile", phonenumbers.PhoneNumberType.FIXED_LINE: "fixed",
             phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE: "either"}
    return names.get(t) in kinds or names.get(t) == "either"


def valid_mobile_pn(s: str) -> bool:
    return valid_mobile_rules(s) and _pn_valid("+86" + _national_mobile(s), None, ("mobile",))


def valid_landline_pn(s: str) -> bool:
    parts = _landline_parts(s)
    return parts is not None and _pn_valid("+86" + parts[0][1:] + parts[1], None, ("fixed",))


def valid_phone_pn(s: str) -> bool:
    return _pn_valid("+" + _digits(s), None, None)


_GLOBAL_V6 = ipaddress.ip_network("2000::/3")  # the only range global unicast addresses are allocated from


# addresses of public services (IANA's example.com/org hosts, public DNS resolvers): never a person's
WELL_KNOWN = {ipaddress.ip_address(a) for a in (
    "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9",
    "208.67.222.222", "114.114.114.114", "114.114.115.115", "223.5.5.5", "223.6.6.6", "119.29.29.29", "180.76.76.76",
    "2001:4860:4860::8888", "2001:4860:4860::8844", "2606:4700:4700::1111", "2400:3200::1", "240c::6666")}


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not ip.is_global or ip.is_multicast or ip in WELL_KNOWN:
        return False
    return ip.version == 4 or ip in _GLOBAL_V6


def valid_ipv4(s: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return _is_public(ip)


def valid_ipv6(s: str) -> bool:
    groups = [g for g in s.split(":") if g]
    if s.endswith("::") or not any(c.isdigit() for c in s):
        return False  # `2004::` is reST's literal marker, `dead::beef` a word pair
    if len(groups) < 3 and max(len(g) for g in groups) < 3:
        return False
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return _is_public(ip)




# generic top-level domains in common use (any two-letter country code is accepted as well)
_GTLDS = set("""com net org edu gov mil int info biz name pro mobi asia aero coop museum travel jobs tel post xxx
app dev ai io tech online site top xyz shop store cloud club vip ltd group work email live life world today news
wang xin ren link space website fun icu ink law kim red pub cool company center host press blog design
email global media network solutions systems team""".split())


_EXAMPLE_DOMAINS = ("example.com", "example.net", "example.org")  # RFC 2606: documentation only, nobody's mailbox


def valid_email(s: str) -> bool:
    local, _, domain = s.rpartition("@")
    domain = domain.lower()
    tld = domain.rsplit(".", 1)[-1]
    if not (len(tld) == 2 or tld in _GTLDS):
        return False  # user@hostname.domainname is a template; .test, .example, .invalid are reserved
    if any(domain == d or domain.endswith("." + d) for d in _EXAMPLE_DOMAINS):
        return False
    return not (local.startswith(".") or local.endswith(".") or ".." in s)


def valid_url_credentials(s: str) -> bool:
    try:
        u = urlsplit(s)
        u.port  # noqa: B018 - raises on a non-numeric port (a template like host:port)
    except ValueError:
        return False
    return bool(u.password) and bool(u.hostname)


# ----------------------------------------------------------------------------- names, addresses

SURNAMES = set(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范"
    "金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪"
    "庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房"
    "滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁"
    "沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝官封谈匡鞠惠荆乐冀郁胥南班储原栗燕楚鄢劳谌奚皮粟冼蔺楼盘满闻位厉伊仝区郜海阚"
    "花权强帅屠豆朴盖练廉禹井祖漆巴丰支卿国狄平计索宣晋相初门云容敬来扈晁芮都普阙浦戈伏鹿薄邸雍辜羊阿乌母裘亓修邰赫杭况那"
    "宿鲜印逯隆茹诸战慕危玉银亢嵇公哈湛宾戎勾茅利於呼居揭干但尉冶斯元束檀衣信展阴昝智幸奉植衡富尧闭由")
COMPOUND_SURNAMES = ("欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
                     "夏侯", "令狐", "端木", "西门", "南宫", "独孤", "轩辕", "百里", "呼延", "澹台", "万俟", "申屠")
# field labels that may follow a value in an unspaced form (姓名：张三性别：男): a value ends where one starts
_NEXT_FIELD = ("性别", "年龄", "电话", "手机", "身份", "证件", "住址", "地址", "民族", "出生", "职业", "科室", "床号",
               "联系", "籍贯", "工作", "单位", "邮箱", "婚姻", "学历", "账号", "帐号", "卡号", "开户", "护照", "病历",
               "诊断", "主诉", "入院", "就诊", "日期", "编号", "邮编", "男", "女", "先生", "女士")
# an address starts with an administrative division (北京市, 广东省, 海淀区...) or has a house number (88号, 501室)
_ADDRESS_START = re.compile(f"[{HAN}]{{1,9}}?(?:省|市|自治区|特别行政区|自治州|区|县|州|盟|旗)")
_HOUSE_NUMBER = re.compile(r"\d+\s*(?:号|室|栋|幢|楼|单元|弄|巷|户)")


def cut_at_next_field(value: str, start: int = 1) -> str:
    """``张三性别`` -> ``张三``: stop a labelled value where the next field label starts."""
    cut = len(value)
    for lab in _NEXT_FIELD:
        i = value.find(lab, start)
        if i != -1 and i < cut:
            cut = i
    return value[:cut]


def chinese_name_ok(v: str, strict: bool) -> bool:
    """2-4 Han characters (or a minority name joined by ·); ``strict`` also wants a known surname."""
    if "·" in v or "•" in v:
        parts = re.split("[·•]", v)
        return len(parts) >= 2 and all(1 <= len(p) <= 10 for p in parts)
    if not 2 <= len(v) <= 4:
        return False
    if strict:
        return (len(v) <= 3 and v[0] in SURNAMES) or v[:2] in COMPOUND_SURNAMES
    return True


def address_ok(v: str) -> bool:
    return len(v) >= 5 and not v[0].isdigit() and (_ADDRESS_START.match(v) is not None or _HOUSE_NUMBER.search(v) is not None)


def english_address_ok(v: str) -> bool:
    return bool(re.match(r"\d{1,6}[A-Za-z]? [A-Z][A-Za-z.'-]+", v)) or bool(re.search(r"\b(?:Street|St\.|Road|Rd\.|Avenue|Ave\.|Lane|Drive|Boulevard|Blvd\.?|Way|Court|Place|Square)\b", v))

