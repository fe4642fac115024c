"""Real text nobody here wrote, from Debian packages fetched with `apt-get download` (slow tests only).

Packages are cached outside the repository in ``$HOMEFORGE_CACHE`` (default
``~/.cache/homeforge``) and never committed. ``pytest.skip`` with the reason when apt
cannot fetch them (no apt, no network, no package lists).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cache_dir(name: str) -> Path:
    root = Path(os.environ.get("HOMEFORGE_CACHE", Path.home() / ".cache" / "homeforge"))
    return root / name


def fetch_deb(package: str) -> Path:
    """The package's files unpacked (``apt-get download`` + ``dpkg-deb -x``), cached; skips if apt cannot."""
    root = cache_dir(package)
    tree = root / "tree"
    if tree.is_dir() and any(tree.rglob("*")):
        return tree
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip(f"{package}: apt-get/dpkg-deb not available to fetch it")
    root.mkdir(parents=True, exist_ok=True)
    debs = list(root.glob(f"{package}_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", package], cwd=root, capture_output=True, text=True, timeout=300)
        debs = list(root.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            pytest.skip(f"apt-get download {package} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    tmp = root / "tree.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True)
    tmp.rename(tree)
    return tree


TECHNICAL = ("Osamu Aoki", "Debian 参考卡片")  # manual sections and reference cards: tables, shell commands


def fortunes_zh() -> list[dict]:
    """Every fortune of Debian's fortunes-zh: {"id", "file", "raw" (with its ANSI colours), "plain", "technical"}."""
    games = fetch_deb("fortunes-zh") / "usr" / "share" / "games" / "fortunes"
    out = []
    for name in ("chinese", "tang300", "song100"):
        text = (games / name).read_text(encoding="utf-8")
        for i, raw in enumerate(text.split("\n%\n")):
            plain = ANSI.sub("", raw).strip()
            if not plain:
                continue
            last = plain.splitlines()[-1]
            out.append({"id": f"{name}:{i}", "file": name, "raw": raw, "plain": plain,
                        "technical": any(t in last for t in TECHNICAL)})
    return out
