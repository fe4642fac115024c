"""Which files of an artifact are encrypted at rest, and encrypting them.

Data files (token shards, JSONL records, weights, checkpoints, the tokenizer's learned
vocabulary) are encrypted with ``crypto``; small metadata (manifest, ``index.json``,
``config.json``, plots, reports) stays readable so ``homeforge verify`` needs no key.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from homeforge.security import crypto
from homeforge.security.keys import DataKey, load_key

FORMAT = "homeforge-aes256gcm-chunked-v1"
# the tokenizer's vocabulary is learned from the data (it can hold frequent names): encrypted too
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")
# data files: tokens, records, weights, checkpoints, feedback/request logs
ENCRYPTED_PATTERNS = ("*.bin", "*.jsonl", "*.safetensors", "*.pt", "*.npy", "*.parquet", "*.gguf", "*.onnx",
                      "*.onnx.data", "*.csv", "*.txt", *TOKENIZER_FILES)
NEVER_ENCRYPTED = ("homeforge.json", "index.json", "config.json", "generation_config.json", "labels.json",
                   "*.png", "tokenizer_config.json", "special_tokens_map.json", "chat_template*", "*.yaml", "*.md",
                   "meta.json", "adapter_config.json", "*.index.json", "quantization.json", "Modelfile",
                   "added_tokens.json")


def should_encrypt(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if name in TOKENIZER_FILES:
        return True
    if any(fnmatch.fnmatch(name, pat) for pat in NEVER_ENCRYPTED):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in ENCRYPTED_PATTERNS)


def load_key_for(encrypt: bool) -> DataKey | None:
    """The data key when ``encrypt`` (a missing key fails now, before any work), else None."""
    return load_key(required=True) if encrypt else None


def encrypt_tree(root: str | Path, key: DataKey, into: str | Path | None = None) -> dict:
    """Encrypt every data file under ``root`` in place, or with ``into`` write the encrypted data files
    and copies of the others into that folder (``root`` is left as it is: the caller deletes it).
    Returns the manifest's ``encryption`` record."""
    import shutil

    root = Path(root)
    dest = Path(into) if into is not None else root
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        target = dest / rel
        if p.is_dir():
            if dest != root:
                target.mkdir(exist_ok=True)
            continue
        if not p.is_file():
            continue
        if not p.name.startswith(".") and should_encrypt(rel):
            crypto.encrypt_file(p, key, dest=target if dest != root else None)
            files.append(rel)
        elif dest != root:
            shutil.copyfile(p, target)
    return {"format": FORMAT, "key_id": key.key_id, "files": files}
