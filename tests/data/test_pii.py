import subprocess
import sys

import pytest

from homeforge.config import PrepareConfig, load_config
from homeforge.data.pii import TYPES, Scrubber, luhn_ok, valid_cn_id, valid_uscc
from homeforge.errors import ConfigError

from . import pii_bench as bench
from .fixtures import bad_card, bad_cn_id, card, cn_id


def test_checksums_against_published_numbers():
    assert valid_cn_id("11010519491231002X")  # the example printed in GB 11643-1999
    assert not valid_cn_id("110105194912310021")
    # unified social credit codes published by well-known companies (GB 32100 + GB 11714 checks)
    for code in ("914403001922038216", "91330100716105852F", "9144030071526726XG"):
        assert valid_uscc(code), code
        assert not valid_uscc(code[:17] + ("0" if code[17] != "0" else "1"))
    assert luhn_ok("4111111111111111") and luhn_ok("4539578763621486") and not luhn_ok("4539578763621487")
    for s in range(20):
        assert valid_cn_id(cn_id(s)) and not valid_cn_id(bad_cn_id(s))
        assert luhn_ok(card(s)) and not luhn_ok(bad_card(s))


def test_the_generator_agrees_with_the_standards_and_libphonenumber():
    """The benchmark's identifiers are checked against oracles that are not the scrubber's code."""
    import random

    rng = random.Random(1)
    for _ in range(200):
        assert valid_cn_id(bench.cn_id(rng)) and valid_uscc(bench.uscc(rng)) and luhn_ok(bench.card(rng))
    phonenumbers = pytest.importorskip("phonenumbers")
    for _ in range(200):
        m = phonenumbers.parse("+86" + bench.mobile(rng))
        assert phonenumbers.number_type(m) == phonenumbers.PhoneNumberType.MOBILE
        area, local = bench.landline(rng)
        assert phonenumbers.is_valid_number(phonenumbers.parse(area + local, "CN")), area + local


def test_unspaced_chinese_and_the_issue_examples():
    s = Scrubber()
    out, counts = s.scrub("患者身份证号110101199003077774，联系电话13812345678")
    assert out == "患者身份证号<CN_ID>，联系电话<CN_MOBILE>" and counts == {"CN_ID": 1, "CN_MOBILE": 1}
    assert s.scrub("+8613812345678")[0] == "<CN_MOBILE>"  # the + stays inside the placeholder
    assert s.scrub("致电+86 138 1234 5678。")[0] == "致电<CN_MOBILE>。"
    for text in ("3.14159265359", "873.9000000000001", "4 Jan 2004::", "[GCC 2.7.2.2]", "0x13812345678",
                 "var13812345678", "1.2.840.113549", "订单号：202403151234567890", "9223372036854775807"):
        assert s.scrub(text) == (text, {}), text
    assert s.scrub("邮箱zhang.wei@hospital.cn联系")[0] == "邮箱<EMAIL>联系"
    assert s.scrub("来源IP58.217.200.37，")[0] == "来源IP<IPV4>，"
    assert s.scrub("身份证号：１１０１０１１９９００３０７７７７４")[0] == "身份证号：<CN_ID>"  # full-width digits


def test_validators_decide_the_type():
    s = Scrubber()
    # an 18-digit number shaped like a resident ID with a wrong check digit is nobody's card, even when Luhn passes
    good = bench.cn_id(__import__("random").Random(3))
    bad = next(good[:17] + c for c in "0123456789" if c != good[17] and luhn_ok(good[:17] + c))
    assert s.scrub(f"编号{bad}")[0] == f"编号{bad}"
    assert s.scrub(f"卡号{card(5)}")[0] == "卡号<BANK_CARD>"
    assert s.scrub("账号：1234 5678 9012 3456 789")[0] == "账号：<BANK_ACCOUNT>"  # account numbers need no Luhn
    assert s.scrub("电话：010-62345678，(021)62345678，0755-88776655转8001")[0] == \
        "电话：<CN_LANDLINE>，<CN_LANDLINE>，<CN_LANDLINE>"
    assert s.scrub("Call +44 20 7946 0958 now")[0] == "Call <PHONE> now"
    assert s.scrub("统一社会信用代码914403001922038216；护照E12345678；港澳通行证C12345678；台胞证12345678")[0] == \
        "统一社会信用代码<CN_USCC>；护照<PASSPORT>；港澳通行证<HKMO_PERMIT>；台胞证<TW_PERMIT>"
    assert s.scrub("车牌粤B12345，新能源京AD12345，粤Z·1234港。")[0] == "车牌<CN_PLATE>，新能源<CN_PLATE>，<CN_PLATE>。"
    assert s.scrub("京ICP备12345678号，粤B2-20090059")[1] == {}  # site and telecom licence numbers
    assert s.scrub("姓名：张三性别：男住址：北京市朝阳区建国路88号院3号楼501室，电话")[0] == \
        "姓名：<NAME>性别：男住址：<ADDRESS>，电话"
    assert s.scrub("Name: John Smith\nAddress: 12 Baker Street, London NW1 6XE\n")[0] == "Name: <NAME>\nAddress: <ADDRESS>\n"
    # the generic key `name` in code names things; only a Chinese personal name counts there
    assert s.scrub("Movie(name='The Birds')")[0] == "Movie(name='The Birds')"
    assert s.scrub("User(name='王芳')")[0] == "User(name='<NAME>')"
    # private, loopback and documentation addresses are not personal; public ones are
    assert s.scrub("127.0.0.1 192.168.1.1 192.0.2.1 2001:db8::1 fe80::1 8.8.8.8")[1] == {}
    assert s.scrub("client 2408:8207:2c1:9e0::1f")[0] == "client <IPV6>"


def test_benchmark_recall_and_decoys():
    """The seeded benchmark: >= 1000 records with identifiers of every type and at least as many decoys."""
    recs = bench.make_records(0, 1200)
    res = bench.evaluate(Scrubber().scrub, recs)
    n_ids = sum(n for n, _ in res["recall"].values())
    n_decoys = sum(n for c, (n, _) in res["untouched"].items() if c != "context")
    assert len(recs) >= 2000 and n_ids >= 1000 and n_decoys >= n_ids
    assert set(res["recall"]) == set(TYPES) and all(n >= 100 for n, _ in res["recall"].values())
    misses = {t: f"{k}/{n}" for t, (n, k) in res["recall"].items() if k / n < 0.995}
    assert not misses, (misses, res["misses"][:5])
    touched = {c: f"{k}/{n}" for c, (n, k) in res["untouched"].items() if k / n < 0.995}
    assert not touched, (touched, res["misses"][:5])


def test_pseudonyms_are_keyed_and_consistent():
    a = Scrubber(mode="pseudonym", secret=b"k" * 32, terms=["Lin Wei", "王芳"], patterns={"MRN": r"MRN-\d{6}"})
    b = Scrubber(mode="pseudonym", secret=b"j" * 32)
    t1, c1 = a.scrub("Lin Wei wrote to x@y.com; 王芳 too. MRN-123456")
    t2, _ = a.scrub("again x@y.com and X@Y.com, other z@y.com")
    assert c1 == {"NAME": 2, "EMAIL": 1, "MRN": 1}
    tok = a.token("EMAIL", "x@y.com")
    assert tok in t1 and t2.count(tok) == 2 and a.token("EMAIL", "z@y.com") in t2
    assert b.token("EMAIL", "x@y.com") != tok and "x@y.com" not in t1 + t2
    assert "Lin Wei" not in t1 and "王芳" not in t1
    # the same number written three ways is the same person: one pseudonym
    t3, _ = a.scrub("手机13812345678，+86 138 1234 5678，138-1234-5678")
    assert len(set(__import__("re").findall(r"<CN_MOBILE_[0-9a-f]{10}>", t3))) == 1


def test_unknown_type_and_missing_secret_are_config_errors(monkeypatch):
    with pytest.raises(ValueError, match="CN_IDD"):
        Scrubber(types=["CN_IDD"])
    with pytest.raises(ConfigError) as e:
        load_config(PrepareConfig, overrides=["pii.types=[EMAIL, CN_IDD]"])
    msg = str(e.value)
    assert "pii.types" in msg and "'CN_IDD'" in msg and "did you mean 'CN_ID'" in msg and "CN_USCC" in msg
    monkeypatch.delenv("HOMEFORGE_PII_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"HOMEFORGE_PII_SECRET is not set"):
        load_config(PrepareConfig, overrides=["pii.mode=pseudonym"])
    monkeypatch.setenv("HOMEFORGE_PII_SECRET", "short")
    with pytest.raises(ConfigError, match="only 5 characters"):
        load_config(PrepareConfig, overrides=["pii.mode=pseudonym"])
    monkeypatch.setenv("HOMEFORGE_PII_SECRET", "s" * 32)
    assert load_config(PrepareConfig, overrides=["pii.mode=pseudonym"]).pii.mode == "pseudonym"


@pytest.mark.parametrize("override", ["pii.types=[EMAIL,PASPORT]", "pii.mode=pseudonym"])
def test_prepare_refuses_bad_pii_config_and_writes_nothing(tmp_path, override):
    (tmp_path / "a.txt").write_text("患者王伟，手机13812345678，病情稳定，今日出院，嘱咐定期复查。")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HOMEFORGE_PII_SECRET"}
    r = subprocess.run([sys.executable, "-m", "homeforge", "prepare", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out"),
                        override], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    assert ("PASPORT" in r.stderr and "PASSPORT" in r.stderr) or "HOMEFORGE_PII_SECRET is not set" in r.stderr
