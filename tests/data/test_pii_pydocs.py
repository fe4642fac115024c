"""The scrubber on text nobody here wrote: the Python documentation's reST sources (Debian's python3.11-doc).

Technical text is full of PII look-alikes (floats, versions, reST ``::``, hex, addresses in examples).
Every replacement left is pinned here and explained in docs/data.md; a new one fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from homeforge.data.pii import Scrubber

CACHE = Path.home() / ".cache" / "homeforge" / "python3.11-doc"
SOURCES = CACHE / "x" / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"

# the only replacements expected, other than e-mail addresses: (file, type, value), see docs/data.md
EXPECTED = Counter({
    ("howto/logging-cookbook.rst.txt", "IPV4", "123.231.231.123"): 5,
    ("library/http.cookiejar.rst.txt", "IPV4", "193.168.1.2"): 1,
    ("library/ipaddress.rst.txt", "IPV4", "126.255.255.255"): 1,
    ("library/ipaddress.rst.txt", "IPV4", "192.0.3.6"): 1,
    ("library/socket.rst.txt", "IPV4", "100.50.200.5"): 2,
    ("library/socket.rst.txt", "IPV4", "123.45.67.89"): 2,
    ("library/socket.rst.txt", "IPV4", "7.10.0.5"): 1,
})


def _fetch() -> Path:
    if SOURCES.is_dir():
        return SOURCES
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not available: cannot fetch python3.11-doc")
    CACHE.mkdir(parents=True, exist_ok=True)

    def download() -> bool:
        r = subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=CACHE, capture_output=True, timeout=600)
        return r.returncode == 0 and any(CACHE.glob("python3.11-doc_*.deb"))

    if not download():
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
        if not download():
            pytest.skip("apt-get download python3.11-doc failed (no package index or no network to Debian's mirror)")
    deb = sorted(CACHE.glob("python3.11-doc_*.deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE / "x")], check=True, capture_output=True, timeout=600)
    return SOURCES


@pytest.mark.slow
def test_python_docs_keep_their_technical_text():
    root = _fetch()
    files = sorted(root.rglob("*.txt"))
    assert len(files) > 400
    s = Scrubber()
    found: Counter = Counter()
    emails = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        for a, b, kind in s.find(text):
            if kind == "EMAIL":
                emails += 1  # authors' and mailing-list addresses: real addresses, replaced on purpose
            else:
                found[(str(f.relative_to(root)), kind, text[a:b])] += 1
    assert found == EXPECTED, sorted((found - EXPECTED).items()) + sorted((EXPECTED - found).items())
    assert 300 <= emails <= 400
