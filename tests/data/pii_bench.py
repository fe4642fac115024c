"""A seeded PII benchmark: identifiers written from their specifications, and decoys.

Nothing here imports the scrubber's rules: check characters are computed from the standards
(GB 11643 / ISO 7064 MOD 11-2 for resident IDs, GB 32100 and GB 11714 for credit codes, ISO/IEC
7812 Luhn for cards), numbers from the numbering plans (MIIT mobile blocks, area codes, ITU
country codes and real area/mobile ranges abroad), formats from how Chinese forms, medical
records and bank records are written: unspaced, glued to Han text and full-width punctuation.

A record is a list of segments: ``("t", text)``, ``("p", TYPE, value)`` (must be replaced by
exactly ``<TYPE>``), ``("d", CLASS, value)`` (must survive byte for byte). ``evaluate`` scrubs
every record and scores each segment.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter

# ----------------------------------------------------------------------------- checksums from the standards


def id_check(body17: str) -> str:
    """GB 11643-1999 / ISO 7064 MOD 11-2: weights 2^(17-i) mod 11; check value (12 - sum) mod 11, 10 -> X."""
    total = sum(int(c) * pow(2, 17 - i, 11) for i, c in enumerate(body17))
    v = (12 - total % 11) % 11
    return "X" if v == 10 else str(v)


def luhn_digit(body: str) -> str:
    """ISO/IEC 7812 Luhn check digit for ``body`` (doubling every second digit from the right of the full number)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # GB 32100-2015 code set: no I, O, S, V, Z


def uscc_check(body17: str) -> str:
    """GB 32100-2015: weights 3^i mod 31; check = 31 - (sum mod 31), 31 -> 0."""
    total = sum(USCC_CHARS.index(c) * pow(3, i, 31) for i, c in enumerate(body17))
    return USCC_CHARS[(31 - total % 31) % 31]


def org_code_check(body8: str) -> str:
    """GB 11714-1997 organisation code: weights 3 7 9 10 5 8 4 2, check = 11 - sum mod 11 (10 -> X, 11 -> 0)."""
    val = {c: i for i, c in enumerate(string.digits + string.ascii_uppercase)}
    total = sum(val[c] * w for c, w in zip(body8, (3, 7, 9, 10, 5, 8, 4, 2), strict=True))
    v = 11 - total % 11
    return "X" if v == 10 else "0" if v == 11 else str(v)


# ----------------------------------------------------------------------------- identifiers

COUNTIES = ("110101", "110105", "110108", "120101", "130102", "140105", "150102", "210102", "220102", "230103",
            "310104", "310115", "320102", "320506", "330106", "340104", "350203", "360103", "370202", "410105",
            "420106", "430104", "440106", "440305", "450103", "460105", "500103", "510107", "520102", "530102",
            "540102", "610113", "620102", "630102", "640104", "650102")


def cn_id(rng: random.Random) -> str:
    y, m = rng.randint(1940, 2012), rng.randint(1, 12)
    d = rng.randint(1, (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[m - 1])
    body = f"{rng.choice(COUNTIES)}{y}{m:02d}{d:02d}{rng.randint(0, 999):03d}"
    return body + id_check(body)


def uscc(rng: random.Random) -> str:
    auth, kind = rng.choice((("9", "1"), ("9", "1"), ("9", "2"), ("1", "1"), ("5", "1"), ("Y", "1")))
    chars = [c for c in USCC_CHARS if c not in "XY"]  # org code body: digits and letters of both code sets
    org = "".join(rng.choice(chars[:10] if rng.random() < 0.7 else chars) for _ in range(8))
    body = auth + kind + rng.choice(COUNTIES) + org + org_code_check(org)
    return body + uscc_check(body)


CARD_BINS = (("622202", 19), ("622848", 19), ("621700", 19), ("622588", 16), ("621661", 19), ("625807", 16),
             ("4", 16), ("4", 16), ("5", 16), ("2", 16), ("34", 15), ("37", 15), ("35", 16))


def card(rng: random.Random) -> str:
    prefix, n = rng.choice(CARD_BINS)
    if prefix == "5":
        prefix = str(rng.randint(51, 55))
    elif prefix == "2":
        prefix = str(rng.randint(2221, 2720))
    elif prefix == "35":
        prefix = str(rng.randint(3528, 3589))
    body = prefix + "".join(rng.choice(string.digits) for _ in range(n - 1 - len(prefix)))
    return body + luhn_digit(body)


MOBILE_BLOCKS = tuple(f"13{i}" for i in range(10)) + ("145", "147", "150", "151", "152", "153", "155", "156", "157",
                                                       "158", "159", "166", "173", "175", "176", "177", "178",
                                                       "180", "181", "182", "183", "184", "185", "186", "187", "188",
                                                       "189", "191", "193", "195", "198", "199")


def mobile(rng: random.Random) -> str:
    return rng.choice(MOBILE_BLOCKS) + "".join(rng.choice(string.digits) for _ in range(8))


AREAS = ("010", "020", "021", "022", "023", "024", "025", "027", "028", "029", "0755", "0571", "0512", "0531",
         "0532", "0731", "0371", "0591", "0898", "0871", "0311", "0551")


def landline(rng: random.Random) -> tuple[str, str]:
    return rng.choice(AREAS), rng.choice("68") + "".join(rng.choice(string.digits) for _ in range(7))


NANP_NXX = ("201", "234", "245", "262", "278", "301", "327", "345", "392", "403", "426", "478", "502", "567", "612",
            "634", "659", "701", "727", "812", "845", "867", "901", "925", "961")  # central office codes in service


def intl_phone(rng: random.Random) -> str:
    """Numbers from blocks in service (the numbering plans of the US, UK, Hong Kong, Macau, Taiwan, Singapore,
    Japan, Germany and France), written the usual ways."""
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    kind = rng.randrange(8)
    if kind == 0:
        a, x = rng.choice(("212", "415", "646", "312", "617", "206", "213", "305", "404", "512")), rng.choice(NANP_NXX)
        return rng.choice((f"+1 {a} {x} {d(4)}", f"+1-{a}-{x}-{d(4)}", f"+1 ({a}) {x}-{d(4)}"))
    if kind == 1:
        return rng.choice((f"+44 20 7{d(3)} {d(4)}", f"+44 7{rng.choice('4589')}{d(2)} {d(6)}"))
    if kind == 2:
        p = rng.choice(("61", "63", "64", "65", "69", "92", "94", "96", "97"))
        return rng.choice((f"+852 {p}{d(2)} {d(4)}", f"+852-{p}{d(6)}"))
    if kind == 3:
        return f"+853 6{rng.choice('235')}{d(2)} {d(4)}"
    if kind == 4:
        return rng.choice((f"+886 9{rng.choice('01235678')}{d(1)} {d(3)} {d(3)}", f"+886-9{rng.choice('0123')}{d(1)}-{d(3)}-{d(3)}"))
    if kind == 5:
        return f"+65 {rng.choice(('8', '9'))}{rng.choice('1234678')}{d(2)} {d(4)}"
    if kind == 6:
        return rng.choice((f"+81 80-{d(4)}-{d(4)}", f"+81 80 {d(4)} {d(4)}"))
    return rng.choice((f"+49 30 {rng.randint(2, 9)}{d(7)}", f"+33 6 {rng.choice('0124')}{d(1)} {d(2)} {d(2)} {d(2)}"))


LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # document series letters skip I and O


def passport(rng: random.Random) -> str:
    d = "".join(rng.choice(string.digits) for _ in range(8))
    return rng.choice((f"E{d}", f"E{d}", f"E{rng.choice(LETTERS)}{d[:7]}", f"G{d}"))


def hkmo_permit(rng: random.Random) -> str:
    d = "".join(rng.choice(string.digits) for _ in range(10))
    return rng.choice((f"C{d[:8]}", f"C{d[:8]}", f"C{rng.choice(LETTERS)}{d[:7]}", f"H{d[:8]}", f"M{d[:8]}",
                       f"H{d}"))


def tw_permit(rng: random.Random) -> tuple[str, bool]:
    """(number, needs_context): mainland residents' permit L + 8 digits; 台胞证 8 digits (only with its label)."""
    d = "".join(rng.choice(string.digits) for _ in range(8))
    return (f"L{d}", False) if rng.random() < 0.5 else (d, True)


PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"


def plate(rng: random.Random) -> str:
    head = rng.choice(PROVINCES) + rng.choice(LETTERS)
    dg = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    kind = rng.randrange(5)
    if kind == 0:
        serial = dg(5)
    elif kind == 1:
        serial = rng.choice(LETTERS) + dg(4)
    elif kind == 2:
        s = list(dg(3) + rng.choice(LETTERS) + rng.choice(LETTERS))
        rng.shuffle(s)
        serial = "".join(s)
    elif kind == 3:  # small new-energy: D (electric) / F (hybrid) + letter or digit + 4 digits
        serial = rng.choice("DF") + rng.choice(LETTERS + string.digits) + dg(4)
    else:  # large new-energy: 5 digits + D/F
        serial = dg(5) + rng.choice("DF")
    return head + rng.choice(("", "", "", "·", " ")) + serial


def account(rng: random.Random) -> str:
    n = rng.choice((12, 15, 17, 19, 20, 22))
    d = "".join(rng.choice(string.digits) for _ in range(n))
    if rng.random() < 0.3:
        d = " ".join(d[i:i + 4] for i in range(0, n, 4))
    return d


GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍建红文辉鹏飞宇浩然子涵欣怡梓轩雨泽晨嘉思佳一诺"
SURNAMES_TOP = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈姚卢"


def cn_name(rng: random.Random) -> str:
    sur = rng.choice(("欧阳", "司马", "诸葛")) if rng.random() < 0.04 else rng.choice(SURNAMES_TOP)
    return sur + "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2, 2))))


EN_FIRST = ("John", "Mary", "James", "Linda", "Robert", "Susan", "David", "Karen", "Wei", "Fang", "Li", "Ming")
EN_LAST = ("Smith", "Johnson", "Brown", "Miller", "Wilson", "Taylor", "Wang", "Zhang", "Chen", "Liu", "O'Neil")


def en_name(rng: random.Random) -> str:
    return f"{rng.choice(EN_FIRST)} {rng.choice(EN_LAST)}"


CITIES = (("北京市", "朝阳区"), ("北京市", "海淀区"), ("上海市", "浦东新区"), ("上海市", "徐汇区"), ("广东省深圳市", "南山区"),
          ("广东省广州市", "天河区"), ("浙江省杭州市", "西湖区"), ("江苏省南京市", "鼓楼区"), ("四川省成都市", "武侯区"),
          ("湖北省武汉市", "洪山区"), ("河南省郑州市", "金水区"), ("山东省青岛市", "市南区"))
ROADS = ("建国路", "中关村大街", "世纪大道", "科技园南路", "天河北路", "文三路", "中山路", "人民南路", "解放大道", "花园路")


def cn_address(rng: random.Random) -> str:
    city, dist = rng.choice(CITIES)
    tail = rng.choice((f"{rng.randint(1, 300)}号", f"{rng.randint(1, 300)}号院{rng.randint(1, 20)}号楼{rng.randint(1, 6)}单元{rng.randint(101, 2505)}室",
                       f"{rng.randint(1, 300)}号{rng.randint(1, 30)}栋{rng.randint(101, 2505)}室"))
    return city + dist + rng.choice(ROADS) + tail


def en_address(rng: random.Random) -> str:
    return rng.choice((f"{rng.randint(1, 999)} Baker Street, London NW1 {rng.randint(1, 9)}XE",
                       f"{rng.randint(100, 9999)} Market Street, San Francisco, CA 941{rng.randint(0, 9)}{rng.randint(0, 9)}",
                       f"Flat {rng.randint(1, 40)}, {rng.randint(1, 99)} Queen's Road, Hong Kong"))


def email(rng: random.Random) -> str:
    py = ("zhang.wei", "wangfang", "li_na88", "liu.yang", "chenjing", "yang.min", "huanglei2020", "zhao.qiang", "j.smith")
    dom = ("163.com", "qq.com", "126.com", "sina.com", "gmail.com", "hospital.org.cn", "bank.com.cn", "corp.cn", "pku.edu.cn")
    return f"{rng.choice(py)}{rng.choice(('', '', str(rng.randint(1, 99))))}@{rng.choice(dom)}"


def url_credentials(rng: random.Random) -> str:
    user, pw = rng.choice(("admin", "app", "backup", "ops")), "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))
    return rng.choice((f"https://{user}:{pw}@intranet.corp.cn/files", f"postgresql://{user}:{pw}@db.corp.cn:5432/prod",
                       f"ftp://{user}:{pw}@ftp.hospital.org.cn/export"))


def public_ipv4(rng: random.Random) -> str:
    while True:
        a = rng.choice((1, 14, 27, 36, 39, 42, 58, 59, 60, 61, 101, 106, 111, 112, 113, 114, 115, 116, 117, 118, 119,
                        120, 121, 122, 123, 124, 125, 175, 180, 182, 183, 202, 210, 211, 218, 219, 220, 221, 222, 223))
        ip = f"{a}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        if not ip.startswith(("192.", "100.6", "100.7", "100.8", "100.9", "100.10", "100.11", "100.12")):
            return ip


def public_ipv6(rng: random.Random) -> str:
    first = rng.choice(("2408", "2409", "240e", "2400", "2a00", "2600", "2606", "2001:da8", "2401"))
    groups = first.split(":") + [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8 - len(first.split(":")))]
    if rng.random() < 0.5:  # compress a run of middle groups
        i = rng.randint(2, 5)
        return ":".join(groups[:i]) + "::" + ":".join(groups[i + 2:])
    return ":".join(groups)


# ----------------------------------------------------------------------------- decoys (must survive unchanged)

def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def decoy(rng: random.Random, cls: str) -> str:
    if cls == "bad_checksum_id":  # right shape, wrong check character; some of them pass Luhn
        good = cn_id(rng)
        return good[:17] + rng.choice([c for c in "0123456789X" if c != good[17]])
    if cls == "bad_luhn_card":
        good = card(rng)
        return good[:-1] + str((int(good[-1]) + rng.randint(1, 9)) % 10)
    if cls == "bad_checksum_uscc":
        good = uscc(rng)
        return good[:17] + rng.choice([c for c in USCC_CHARS if c != good[17]])
    if cls == "float":
        return rng.choice((f"{rng.randint(0, 999)}.{_digits(rng, rng.randint(10, 17))}", f"-{rng.randint(1, 99)}.{_digits(rng, 13)}",
                           f"{rng.randint(1, 9)}.{_digits(rng, 12)}e-{rng.randint(1, 20):02d}", "3.14159265359",
                           "873.9000000000001", "0.05954861408025609", f"{_digits(rng, 11)}.{rng.randint(0, 9)}"))
    if cls == "version":
        return rng.choice((f"{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
                           f"v{rng.randint(0, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
                           f"{rng.randint(1, 20)}.{rng.randint(0, 9)}.{rng.randint(10000, 30000)}.{rng.randint(0, 999)}",
                           "1.2.840.113549.1.1.11", f"3.{rng.randint(6, 13)}.{rng.randint(0, 12)}"))
    if cls == "date_time":
        y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
        hh, mm, ss = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        return rng.choice((f"{y}-{m:02d}-{d:02d}", f"{y}/{m:02d}/{d:02d}", f"{y}{m:02d}{d:02d}", f"{y}年{m}月{d}日",
                           f"{hh:02d}:{mm:02d}:{ss:02d}", f"{y}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}+08:00",
                           f"{y}{m:02d}{d:02d}{hh:02d}{mm:02d}{ss:02d}", f"{d} Jan {y}::"))
    if cls == "rest_markup":
        return rng.choice((f"{rng.randint(1990, 2030)}::", f"Example {rng.randint(1, 99)}::", "::", "For example::",
                           f"{rng.randint(1, 28)} Jan {rng.randint(1990, 2030)}::", f"{rng.randint(10, 99)}:{rng.randint(10, 99)}::"))
    if cls == "hash":
        return "".join(rng.choice("0123456789abcdef") for _ in range(rng.choice((7, 12, 32, 40, 64))))
    if cls == "hex_literal":
        return rng.choice((f"0x{rng.randint(0, 2**32):08x}", f"0x{_digits(rng, 11)}", f"0X{rng.randint(0, 2**40):X}",
                           f"#{rng.randint(0, 2**24):06x}", f"\\x{rng.randint(0, 255):02x}"))
    if cls == "uuid":
        h = lambda n: "".join(rng.choice("0123456789abcdef") for _ in range(n))  # noqa: E731
        return f"{h(8)}-{h(4)}-4{h(3)}-a{h(3)}-{h(12)}"
    if cls == "code_identifier":
        return rng.choice((f"var{mobile(rng)}", f"user_{cn_id(rng)}", f"ID{passport(rng)}", f"x{card(rng)}",
                           f"tmp_{_digits(rng, 8)}", f"test{hkmo_permit(rng)}", f"{mobile(rng)}abc", f"{cn_id(rng)}_bak"))
    if cls == "order_number":
        return rng.choice((f"订单号：{rng.randint(2019, 2025)}{_digits(rng, 14)}", f"快递单号SF{_digits(rng, 12)}",
                           f"Order #{_digits(rng, 9)}", f"发票号码{_digits(rng, 8)}", f"ISBN 978-7-{_digits(rng, 3)}-{_digits(rng, 5)}-{rng.randint(0, 9)}",
                           f"CVE-{rng.randint(2000, 2025)}-{_digits(rng, 5)}", f"京ICP备{_digits(rng, 8)}号", f"粤B2-{_digits(rng, 8)}"))
    if cls == "big_integer":
        return rng.choice(("9223372036854775807", "18446744073709551615", "4294967296", str(rng.randint(1_600_000_000, 1_800_000_000)),
                           str(rng.randint(1_600_000_000_000, 1_800_000_000_000)), f"{rng.randint(1, 9)},{_digits(rng, 3)},{_digits(rng, 3)},{_digits(rng, 3)}",
                           str(2 ** rng.randint(40, 64))))
    if cls == "nonpublic_ip":
        return rng.choice(("127.0.0.1", f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}", f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.1",
                           "192.0.2.1", "255.255.255.0", "0.0.0.0", "2001:db8::1", "fe80::1ff:fe23:4567:890a", "::1",
                           f"172.{rng.randint(16, 31)}.0.{rng.randint(1, 254)}", "203.0.113.7"))
    if cls == "network_prefix":
        return rng.choice((f"{public_ipv4(rng)}/24", f"{public_ipv6(rng).split('::')[0]}::/48", "10.0.0.0/8"))
    if cls == "mac_and_times":
        return rng.choice((":".join(f"{rng.randint(0, 255):02X}" for _ in range(6)), f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                           f"{rng.randint(0, 99):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{_digits(rng, 3)}"))
    if cls == "short_numbers":
        return rng.choice(("10086", "95588", "400-810-8888", "12345", f"{rng.randint(1, 999)} 元", f"第{rng.randint(1, 300)}号",
                           f"{rng.randint(10, 99)}.{rng.randint(0, 9)}%", f"{_digits(rng, 6)}"))
    if cls == "han_after_label":  # a label followed by something that is not a name or an address
        return rng.choice(("患者病情稳定", "患者于今日入院", "客户服务中心", "联系人信息不完整", "地址栏中输入网址", "IP地址配置错误",
                           "患者无发热", "收件人信息有误", "姓名不详", "住址不详"))
    if cls == "plus_numbers":  # a + before digits that is not a phone number
        a, b = rng.randint(10**5, 10**9), rng.randint(10**5, 10**9)
        return rng.choice((f"余额变动+{rng.randint(10**5, 10**8)}元", f"UTC+0{rng.randint(0, 9)}:00", f"+0{rng.randint(1, 9)}00",
                           f"{a}+{b}={a + b}", f"{rng.randint(1, 9)}.{rng.randint(1, 9)}e+{rng.randint(10, 30)}",
                           f"+{rng.randint(100, 9999)} -{rng.randint(100, 9999)} lines", f"2.{rng.randint(0, 5)}.0+cu{rng.randint(110, 128)}",
                           f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(100, 999)} €", f"delta=+{rng.randint(10**6, 10**8)}"))
    if cls == "coordinates":
        return f"{rng.randint(18, 53)}.{_digits(rng, 6)}, {rng.randint(73, 135)}.{_digits(rng, 6)}"
    raise ValueError(cls)


DECOY_CLASSES = ("bad_checksum_id", "bad_luhn_card", "bad_checksum_uscc", "float", "version", "date_time", "rest_markup",
                 "hash", "hex_literal", "uuid", "code_identifier", "order_number", "big_integer", "nonpublic_ip",
                 "network_prefix", "mac_and_times", "short_numbers", "han_after_label", "coordinates", "plus_numbers")


# ----------------------------------------------------------------------------- records

FW_DIGITS = str.maketrans("0123456789", "０１２３４５６７８９")
ZH_END = ("，", "。", "；", "\n", "）", " ", "，请核实。", "。\n")
ZH_GLUE = ("已核实", "的客户", "登记在案", "，", "。")  # Han text glued after a number


def _mobile_fmt(rng: random.Random, m: str) -> str:
    return rng.choice((m, m, m, f"{m[:3]} {m[3:7]} {m[7:]}", f"{m[:3]}-{m[3:7]}-{m[7:]}", f"+86 {m[:3]} {m[3:7]} {m[7:]}",
                       f"+86{m}", f"+86-{m[:3]}-{m[3:7]}-{m[7:]}", f"(+86){m}", f"0086 {m}", f"86-{m}"))


def _card_fmt(rng: random.Random, c: str) -> str:
    if len(c) == 15:
        return rng.choice((c, f"{c[:4]} {c[4:10]} {c[10:]}"))
    groups = [c[i:i + 4] for i in range(0, len(c), 4)]
    return rng.choice((c, c, " ".join(groups), "-".join(groups)))


def _landline_segments(rng: random.Random) -> list[tuple]:
    area, local = landline(rng)
    a = area[1:]
    f = rng.randrange(9)
    if f == 8:  # area code given apart: the local number is the identifier, the city code stays
        return [("t", rng.choice(("区号", "（区号"))), ("t", area), ("t", rng.choice(("，电话", "）电话：", " 电话 "))),
                ("p", "CN_LANDLINE", local)]
    if f == 7:
        return [("t", rng.choice(("电话", "座机：", "Tel: "))), ("p", "CN_LANDLINE", area + local)]
    v = (f"{area}-{local}", f"({area}){local}", f"（{area}）{local}", f"{area} {local[:4]} {local[4:]}",
         f"+86 {a} {local[:4]} {local[4:]}", f"+86-{a}-{local}", f"{area}-{local}-{rng.randint(1, 9999)}")[f]
    return [("t", rng.choice(("电话：", "办公电话", "座机", "联系电话：", "Tel: ", "Office: ", "传真"))), ("p", "CN_LANDLINE", v)]


def _ident(rng: random.Random, typ: str, style: str) -> list[tuple]:
    """One identifier with its label, in style zh (unspaced Chinese), en, json or code."""
    fw = style == "zh" and rng.random() < 0.04  # full-width digits typed in a Chinese IME
    zh = style == "zh"
    if typ == "CN_LANDLINE":
        return _landline_segments(rng)
    if typ == "CN_ID":
        v = cn_id(rng)
        if rng.random() < 0.05:
            v = v.lower() if v.endswith("X") else f"{v[:6]} {v[6:14]} {v[14:]}"
        label = rng.choice(("身份证号", "身份证号码：", "公民身份号码", "证件号码：", "身份证")) if zh else rng.choice(("ID card no. ", "Resident ID: "))
    elif typ == "CN_USCC":
        v = uscc(rng)
        label = rng.choice(("统一社会信用代码：", "信用代码", "统一社会信用代码")) if zh else "USCC: "
    elif typ == "BANK_CARD":
        v = _card_fmt(rng, card(rng))
        label = rng.choice(("银行卡号", "卡号：", "绑定银行卡", "信用卡", "借记卡")) if zh else rng.choice(("card ", "Card number: ", "paid with "))
    elif typ == "BANK_ACCOUNT":
        v = account(rng)
        label = rng.choice(("账号：", "银行账号", "收款账号：", "开户行：中国工商银行北京分行 账号：", "开户行中国建设银行深圳支行",
                            "帐号")) if zh else rng.choice(("Account No.: ", "A/C ", "account number "))
    elif typ == "CN_MOBILE":
        v = _mobile_fmt(rng, mobile(rng))
        label = rng.choice(("手机", "手机号：", "联系电话", "电话：", "预留手机", "")) if zh else rng.choice(("mobile ", "Tel: ", "call ", ""))
    elif typ == "PHONE":
        v = intl_phone(rng)
        label = rng.choice(("境外电话：", "联系电话", "电话")) if zh else rng.choice(("call ", "Tel: ", "WhatsApp ", "phone "))
    elif typ == "PASSPORT":
        v = passport(rng)
        label = rng.choice(("护照号码", "护照号：", "护照", "持护照")) if zh else rng.choice(("passport ", "Passport No. "))
    elif typ == "HKMO_PERMIT":
        v = hkmo_permit(rng)
        label = rng.choice(("港澳通行证", "往来港澳通行证号码：", "回乡证", "证件号")) if zh else rng.choice(("permit ", "travel permit "))
    elif typ == "TW_PERMIT":
        v, needs = tw_permit(rng)
        label = rng.choice(("台胞证号码", "台胞证：", "台湾居民来往大陆通行证")) if needs else rng.choice(("大陆居民往来台湾通行证", "赴台通行证", "permit "))
    elif typ == "CN_PLATE":
        v = plate(rng)
        label = rng.choice(("车牌号", "车牌：", "号牌号码", "车辆", "")) if zh else rng.choice(("plate ", "licence plate "))
    elif typ == "EMAIL":
        v = email(rng)
        label = rng.choice(("邮箱", "电子邮件：", "联系邮箱", "")) if zh else rng.choice(("mail ", "Email: ", "contact "))
    elif typ == "URL_CREDENTIALS":
        v = url_credentials(rng)
        label = rng.choice(("连接串：", "数据库连接", "备份到")) if zh else rng.choice(("dsn = ", "fetch ", "backup to "))
    elif typ == "IPV4":
        v = public_ipv4(rng)
        label = rng.choice(("来源IP", "IP地址：", "登录IP", "服务器")) if zh else rng.choice(("from ", "client ", "Server ", "IP ", "reverse proxy "))
    elif typ == "IPV6":
        v = public_ipv6(rng)
        label = rng.choice(("来源IP", "IPv6地址：", "登录地址")) if zh else rng.choice(("from ", "client ", "host "))
    elif typ == "NAME":
        v = cn_name(rng) if zh or rng.random() < 0.3 else en_name(rng)
        if zh:
            label = rng.choice(("姓名：", "联系人：", "患者", "收件人：", "持卡人：", "户名：", "姓名", "患者姓名：", "紧急联系人"))
        else:
            label = rng.choice(("Name: ", "Patient name: ", "Contact: ", "Full name: "))
    elif typ == "ADDRESS":
        v = cn_address(rng) if zh or rng.random() < 0.3 else en_address(rng)
        label = rng.choice(("住址：", "地址：", "家庭住址：", "收货地址：", "住址", "现住址")) if zh else rng.choice(("Address: ", "Home address: "))
    else:
        raise ValueError(typ)
    if fw and typ not in ("NAME", "ADDRESS", "EMAIL", "URL_CREDENTIALS", "IPV6"):
        v = v.translate(FW_DIGITS)
    if style == "json":
        key = {"NAME": "name" if v[0] >= "\u3400" else "full_name", "ADDRESS": "address", "CN_ID": "id_card", "CN_MOBILE": "phone", "BANK_ACCOUNT": "account_no",
               "PASSPORT": "passport", "EMAIL": "email"}.get(typ)
        if key is None:  # keep a label the type needs, inside the value's key
            key = label.strip(" :：=")
        return [("t", f'"{key}": "'), ("p", typ, v), ("t", '"')]
    if style == "code":
        q = '"' if "'" in v else "'"  # a quote the value does not contain, as in real code
        key = {"NAME": "name" if v[0] >= "\u3400" else "patient_name", "ADDRESS": "address"}.get(typ)
        if key:
            return [("t", f"{key}={q}"), ("p", typ, v), ("t", q)]
        return [("t", f"{label.strip() or 'x ='} {q}"), ("p", typ, v), ("t", q)]
    return [("t", label), ("p", typ, v)]


ZH_FILLERS = ("入院日期{d}", "体温{f}℃", "版本{v}已上线", "订单{o}已发货", "记录编号{h}", "检查时间{d}", "系统日志{d}",
              "配置文件校验值{h}", "坐标{c}", "内网地址{n}")
EN_FILLERS = ("released in {v}", "checksum {h}", "at {d}", "took {f} seconds", "see {o}", "value {b}", "internal host {n}")


def _filler(rng: random.Random, zh: bool) -> list[tuple]:
    """A sentence around one decoy."""
    tpl = rng.choice(ZH_FILLERS if zh else EN_FILLERS)
    key = re.search(r"\{(\w)\}", tpl).group(1)
    cls = {"d": "date_time", "f": "float", "v": "version", "o": "order_number", "h": rng.choice(("hash", "uuid", "hex_literal")),
           "c": "coordinates", "b": "big_integer", "n": "nonpublic_ip"}[key]
    pre, post = tpl.split("{" + key + "}")
    return [("t", pre), ("d", cls, decoy(rng, cls)), ("t", post)]


def _sep(rng: random.Random, zh: bool) -> tuple:
    return ("t", rng.choice(("，", "，", "；", "。", "\n")) if zh else rng.choice((", ", "; ", ". ", "\n")))


def _join(parts: list[list[tuple]], rng: random.Random, zh: bool) -> list[tuple]:
    out: list[tuple] = []
    for i, p in enumerate(parts):
        if i:  # an English address has commas inside: a form ends its field with a line break or a full stop
            en_addr = not zh and out[-1][0] == "p" and out[-1][1] == "ADDRESS"
            out.append(("t", rng.choice(("\n", "; ", ". "))) if en_addr else _sep(rng, zh))
        out += p
    out.append(("t", rng.choice(("。", "\n")) if zh else "."))
    return out


PII_TYPES = ("CN_ID", "CN_USCC", "BANK_CARD", "BANK_ACCOUNT", "CN_MOBILE", "CN_LANDLINE", "PHONE", "PASSPORT",
             "HKMO_PERMIT", "TW_PERMIT", "CN_PLATE", "EMAIL", "URL_CREDENTIALS", "IPV4", "IPV6", "NAME", "ADDRESS")
FORMS = (("NAME", "CN_ID", "CN_MOBILE", "ADDRESS"), ("NAME", "BANK_ACCOUNT", "BANK_CARD", "CN_MOBILE"),
         ("CN_USCC", "NAME", "CN_LANDLINE", "ADDRESS", "EMAIL"), ("NAME", "PASSPORT", "HKMO_PERMIT", "TW_PERMIT", "PHONE"),
         ("NAME", "CN_PLATE", "CN_MOBILE", "CN_ID"), ("IPV4", "IPV6", "URL_CREDENTIALS", "EMAIL"))


def make_records(seed: int = 0, n: int = 1200) -> list[list[tuple]]:
    """``n`` records with identifiers (forms, sentences, JSON, code) and ``n`` decoy-only records."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        style = rng.choice(("zh", "zh", "zh", "en", "json", "code"))
        zh = style == "zh"
        if style in ("json", "code"):
            types = list(rng.choice(FORMS))
            fields = [_ident(rng, t, style) for t in types]
            if style == "json":
                rec = [("t", "{")]
                for j, f in enumerate(fields):
                    rec += ([("t", ", ")] if j else []) + f
                rec += [("t", ', "updated": "'), ("d", "date_time", decoy(rng, "date_time")), ("t", '"}')]
            else:
                rec = [("t", "record = Record(")]
                for j, f in enumerate(fields):
                    rec += ([("t", ", ")] if j else []) + f
                rec += [("t", ")  # checked "), ("d", "hash", decoy(rng, "hash")), ("t", "\n")]
            recs.append(rec)
            continue
        if i % 3 == 0:  # a form: several fields, with decoy sentences between
            parts = [_ident(rng, t, style) for t in rng.choice(FORMS)]
            parts.insert(rng.randint(0, len(parts)), _filler(rng, zh))
        else:  # one or two identifiers of the round-robin type in a sentence
            typ = PII_TYPES[i % len(PII_TYPES)]
            parts = [_ident(rng, typ, style), _filler(rng, zh)]
            rng.shuffle(parts)
        recs.append(_join(parts, rng, zh))
    for _ in range(n):  # decoy-only records: technical and Chinese prose with look-alikes
        zh = rng.random() < 0.5
        parts = []
        for _ in range(rng.randint(2, 4)):
            cls = rng.choice(DECOY_CLASSES)
            if zh:
                pre = rng.choice(("数值", "参见", "编号", "记录", "", "结果为", "备注："))
            else:
                pre = rng.choice(("value ", "see ", "got ", "", "-> ", "returns "))
            parts.append([("t", pre), ("d", cls, decoy(rng, cls)), ("t", rng.choice(("", " ok", "无误" if zh else " done")))])
        recs.append(_join(parts, rng, zh))
    return recs


def render(rec: list[tuple]) -> str:
    return "".join(s[1] if s[0] == "t" else s[2] for s in rec)


def evaluate(scrub, recs: list[list[tuple]]) -> dict:
    """Score ``scrub(text) -> (text, counts)`` on the records.

    An identifier counts as found when exactly its characters became ``<TYPE>`` (placeholder mode);
    a decoy when it came out byte for byte. The text between them is pinned too (class ``context``):
    a record whose fixed text changed fails every item in it.
    """
    found: Counter = Counter()
    total: Counter = Counter()
    kept: Counter = Counter()
    seen: Counter = Counter()
    misses: list[tuple[str, str, str]] = []
    for rec in recs:
        out, _ = scrub(render(rec))
        # the expected outcome first, so that a value containing separator text cannot shift the alignment
        rx = "".join(re.escape(s[1]) if s[0] == "t" else f"(<{s[1]}>|.*?)" if s[0] == "p" else f"({re.escape(s[2])}|.*?)"
                     for s in rec)
        m = re.fullmatch(rx, out, re.S)
        items = [s for s in rec if s[0] != "t"]
        got = list(m.groups()) if m else [None] * len(items)
        seen["context"] += 1
        kept["context"] += m is not None
        for s, g in zip(items, got, strict=True):
            if s[0] == "p":
                total[s[1]] += 1
                ok = g == f"<{s[1]}>"
                found[s[1]] += ok
                if not ok:
                    misses.append((s[1], s[2], out))
            else:
                seen[s[1]] += 1
                ok = g == s[2]
                kept[s[1]] += ok
                if not ok:
                    misses.append((s[1], s[2], out))
    return {"recall": {t: (total[t], found[t]) for t in sorted(total)},
            "untouched": {c: (seen[c], kept[c]) for c in sorted(seen)}, "misses": misses}


def table(result: dict) -> str:
    lines = ["| type | n | recall |", "| --- | ---: | ---: |"]
    for t, (n, k) in result["recall"].items():
        lines.append(f"| {t} | {n} | {k / n:.1%} |")
    lines += ["", "| decoy class | n | untouched |", "| --- | ---: | ---: |"]
    for c, (n, k) in result["untouched"].items():
        lines.append(f"| {c} | {n} | {k / n:.1%} |")
    return "\n".join(lines)
