"""Cleaning and quality filters on unspaced Chinese, mixed and English text (data/clean.py)."""

from __future__ import annotations

import pytest

from homeforge.config import CleanConfig
from homeforge.data.clean import normalize, quality_reason

# clean text nobody would drop: classical quotes, proverbs, a Chinese guide, mixed technical prose, English
CLEAN = [
    "子曰：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？”",  # symbol_ratio before
    "子曰：“君子不器。”",
    "三人行，必有我师焉。",  # too_short before
    "失败是成功之母。",
    "早起的鸟儿有虫吃。",
    "一个和尚挑水喝，两个和尚抬水喝，三个和尚没水喝。",  # repeated_ngrams before
    "一寸光阴一寸金，寸金难买寸光阴。",
    "患者入院后完成了血常规检查（结果见附件），医生建议：多休息、多饮水。",
    "我们使用 Python 3.11 的 asyncio 模块处理并发请求，每秒可以处理约 2000 个连接。",
    "「知之为知之，不知为不知，是知也。」——《论语·为政》",
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "登鹳雀楼\n白日依山尽，\n黄河入海流。\n欲穷千里目，\n更上一层楼。",  # short_lines before
    "安装完成后，运行 `pip install homeforge`；如果失败……请检查网络代理设置。",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Use the --force flag only when you are sure the output directory may be replaced.",
]
# junk that must still go, with the reason (each filter still works)
JUNK = [
    ("┌────┬────┐\n│ a  │ b  │\n├────┼────┤\n│ 1  │ 2  │\n└────┴────┘", "symbol_ratio"),
    ("点击这里领取优惠！" * 8, "repeated_ngrams"),
    ("buy now " * 30, "repeated_ngrams"),
    ("Orz", "too_short"),
    ("好", "too_short"),
    ("12345 67890 13579 24680 11223 44556", "digit_ratio"),
    ("\n".join(["同一行重复出现。"] * 6), "repeated_lines"),
]


@pytest.mark.parametrize("text", CLEAN, ids=[f"clean{i}" for i in range(len(CLEAN))])
def test_clean_chinese_english_and_mixed_records_are_kept(text):
    cfg = CleanConfig()
    assert quality_reason(normalize(text, cfg), cfg) is None


@pytest.mark.parametrize(("text", "reason"), JUNK, ids=[f"{r}{i}" for i, (_, r) in enumerate(JUNK)])
def test_junk_is_still_dropped_with_its_measured_value(text, reason):
    from homeforge.data.clean import check

    cfg = CleanConfig()
    d = check(normalize(text, cfg), cfg)
    assert d is not None and d.reason == reason
    if reason != "too_short" or d.value is not None:
        assert d.value is not None and d.limit is not None and str(d.limit)[:3] in d.detail()


def test_full_width_punctuation_is_kept_byte_for_byte_and_full_width_digits_fold():
    cfg = CleanConfig()
    text = "问：价格是多少？答：￥１２０（含税）！地址：北京市；电话：１３８１２３４５６７８。「好」…"
    out = normalize(text, cfg)
    for ch in "：？￥（）！；「」…。":
        assert out.count(ch) == text.count(ch), ch
    assert "120" in out and "13812345678" in out  # full-width digits fold (PII detectors see ASCII digits)
    assert "ＡＢＣ" not in normalize("型号ＡＢＣ－１", cfg) and "ABC" in normalize("型号ＡＢＣ－１", cfg)
    # the old default, plain NFKC, turns them into ASCII; NFC keeps everything as typed
    assert normalize(text, CleanConfig(unicode_form="NFKC")).count("，") == 0
    assert "：？" not in normalize("问：？", CleanConfig(unicode_form="NFKC"))
    assert normalize(text, CleanConfig(unicode_form="NFC")) == text
    # the ideographic space survives collapsing inside a line, leading indentation goes
    assert normalize("\u3000\u3000床前明月光\u3000\u3000疑是地上霜", cfg) == "床前明月光\u3000疑是地上霜"


def test_measured_values_are_independent_counts():
    from homeforge.data.clean import check

    cfg = CleanConfig()
    text = "a+b=c; x*y=z! (p|q) & {r} # s"  # 29 characters, symbols counted by hand below
    symbols = sum(1 for c in text if not c.isalnum() and not c.isspace())
    d = check(text, cfg)
    assert d.reason == "symbol_ratio" and d.value == round(symbols / len(text), 4) and d.limit == 0.3
    assert d.detail() == f"symbol ratio {symbols / len(text):.2f} > 0.30"
    zh = "知足常乐"
    d = check(zh, cfg)
    assert d.reason == "too_short" and d.value == 12 and "CJK characters count 3" in d.detail()


def test_zero_switches_every_ratio_filter_off():
    text = "┌────┬────┐\n│ 1  │ 2  │\n│ 1  │ 2  │\n│ 1  │ 2  │\n└────┴────┘"
    strict = CleanConfig(min_chars=0, min_words=0)
    check = quality_reason
    assert check(text, strict) is not None
    off = CleanConfig(min_chars=0, min_words=0, max_symbol_ratio=0, max_digit_ratio=0, max_dup_line_fraction=0,
                      max_top_ngram_fraction=0, max_short_line_fraction=0)
    assert check(text, off) is None
    assert check("1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0", off) is None
    assert check("\n".join(["same line here ok"] * 8), off) is None
    assert check("spam " * 40, off) is None


def test_words_and_repetition_on_characters_for_cjk():
    from homeforge.data.clean import top_ngram_coverage, words

    assert words("用 Python 写代码") == ["用", "Python", "写", "代", "码"]
    cov, top = top_ngram_coverage(list("哈哈哈哈哈哈哈哈哈哈"), 5)
    assert cov == 1.0 and top == 6
    # overlaps counted once: "a b a b a b" with the 2-gram (a b) at 0, 2, 4 covers all six words
    assert top_ngram_coverage("a b a b a b".split(), 2) == (1.0, 3)


def test_html_tags_go_but_technical_angle_brackets_stay():
    cfg = CleanConfig()
    html = '<div class="note">患者<b>已出院</b>。<br/><img src="a.png" alt="x y"></div>'
    assert normalize(html, cfg) == "患者 已出院 。"
    for tech in ["cat >aptftp.conf <<EOF\nAPT::FTPArchive::Release {\nOrigin \"Foo\";\n};\nEOF",
                 "std::vector<int> v; #include <stdio.h>", "if (a < b && c > d) { return <T>(x); }"]:
        assert normalize(tech, cfg) == tech
