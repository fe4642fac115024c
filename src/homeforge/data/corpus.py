"""Built-in corpus: docstrings of the running interpreter's standard library.

English technical prose that exists on every machine with Python, so the quickstart
needs no download and nothing is copied into the repository.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

_SKIP_PARTS = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_dir()
    return sorted(p for p in root.rglob("*.py") if not (_SKIP_PARTS & set(p.relative_to(root).parts[:-1])))


def docstrings(path: Path) -> Iterator[str]:
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc.strip()


def stdlib_docstrings(max_chars: int, min_chars: int = 80, progress=None) -> list[str]:
    """Unique docstrings (in file order) until ``max_chars`` characters are collected."""
    files = stdlib_files()
    seen: set[str] = set()
    docs: list[str] = []
    total = 0
    for path in files:
        if progress is not None:
            progress()
        for doc in docstrings(path):
            if len(doc) < min_chars:
                continue
            key = hashlib.sha1(doc.encode()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                return docs
    return docs


