from homeforge.data.pii import Scrubber, luhn_ok, valid_cn_id

from .fixtures import bad_card, bad_cn_id, card, cn_id


def test_checksums():
    assert valid_cn_id("11010519491231002X")  # the GB 11643 standard's example
    assert not valid_cn_id("110105194912310021")
    assert luhn_ok("4539578763621486") and not luhn_ok("4539578763621487")
    for s in range(20):
        assert valid_cn_id(cn_id(s)) and not valid_cn_id(bad_cn_id(s))
        assert luhn_ok(card(s)) and not luhn_ok(bad_card(s))


def test_detectors_fire_on_valid_and_not_on_invalid():
    s = Scrubber()
    text = (f"id {cn_id(1)} card {card(2)} bad id {bad_cn_id(3)} bad card {bad_card(4)} "
            "mail a.b@x.org mobile +86 139 1234 5678 land (021)62345678 intl +1 415 555 2671 "
            "ip 10.0.0.1 not-ip 999.1.1.1 v6 fe80::1ff:fe23:4567:890a time 12:30:45 "
            "url ftp://u:pw@h.example/x version 3.10.12")
    out, counts = s.scrub(text)
    assert counts == {"CN_ID": 1, "BANK_CARD": 1, "EMAIL": 1, "CN_MOBILE": 1, "CN_LANDLINE": 1, "PHONE": 1,
                      "IPV4": 1, "IPV6": 1, "URL_CREDENTIALS": 1}
    assert bad_cn_id(3) in out and bad_card(4) in out and "999.1.1.1" in out and "12:30:45" in out
    assert "3.10.12" in out and "<EMAIL>" in out and cn_id(1) not in out


def test_pseudonyms_are_keyed_and_consistent():
    a = Scrubber(mode="pseudonym", secret=b"k" * 32, terms=["Lin Wei", "王芳"], patterns={"MRN": r"MRN-\d{6}"})
    b = Scrubber(mode="pseudonym", secret=b"j" * 32)
    t1, c1 = a.scrub("Lin Wei wrote to x@y.com; 王芳 too. MRN-123456")
    t2, _ = a.scrub("again x@y.com and x@y.com, other z@y.com")
    assert c1 == {"NAME": 2, "EMAIL": 1, "MRN": 1}
    tok = a.token("EMAIL", "x@y.com")
    assert tok in t1 and t2.count(tok) == 2 and a.token("EMAIL", "z@y.com") in t2
    assert b.token("EMAIL", "x@y.com") != tok and "x@y.com" not in t1 + t2
    assert "Lin Wei" not in t1 and "王芳" not in t1
