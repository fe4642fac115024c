"""The one reader of the dataset format (docs/DEVELOPING.md): training, eval, compress and the
quickstart all read datasets through ``DatasetReader``.

Every file is checked against the dataset's manifest before it is used (``integrity``): the
manifest's seal, the presence and size of every file and ``index.json``/``labels.json`` when
the dataset is opened; a split's token shard, token records or cleaned records when that
split is first read (so eval does not hash the token shards it never reads). A flipped byte,
a truncated or deleted file, an edited index or manifest is refused with the file named.
Encrypted files are decrypted transparently (and authenticated chunk by chunk). A folder
without a manifest (made by hand, or by another tool in this layout) is read unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from homeforge import integrity
from homeforge.errors import ArtifactError, HomeforgeError

INDEX = "index.json"


class DatasetReader:
    def __init__(self, root: Path, index: dict, manifest: dict | None):
        self.root = root
        self.index = index
        self.manifest = manifest
        self._verified: set[str] = set()
        self._tokenizer = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | Path) -> DatasetReader:
        p = Path(root).expanduser().absolute()
        if not p.is_dir():
            raise HomeforgeError(f"dataset directory {p} does not exist", where=str(p),
                                 fix="make it with `homeforge prepare`, or correct the path")
        manifest = integrity.open_manifest(p)  # seal; every file present with its size, nothing added
        reader = cls(p, {}, manifest)
        reader._file(INDEX)
        reader._file("labels.json")
        reader.index = reader._read_index()
        return reader

    def _read_index(self) -> dict:
        path = self.root / INDEX
        if not path.is_file():
            raise ArtifactError(f"{self.root} has no token shards ({INDEX} missing)", where=str(self.root),
                                fix="point to a dataset made by `homeforge prepare` or `homeforge quickstart`")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is unreadable ({exc})", where=str(path), fix="re-run `homeforge prepare`") from None
        if not isinstance(index, dict) or not isinstance(index.get("splits", {}), dict):
            raise ArtifactError(f"{path} is not a dataset index", where=str(path), fix="re-run `homeforge prepare`")
        return index

    def _file(self, rel: str) -> Path:
        """``root/rel``, checked against the manifest the first time it is asked for."""
        path = self.root / rel
        if rel not in self._verified and self.manifest is not None:
            if rel in self.manifest["files"]:
                integrity.hash_files(self.root, self.manifest, [rel])
            elif path.exists():
                raise integrity.IntegrityError(f"dataset {self.root}: {rel} is not in its manifest (added after the "
                                               "dataset was made)", where=str(path),
                                               fix="remove it, or re-run `homeforge prepare`")
        self._verified.add(rel)
        return path

    # ------------------------------------------------------------------ facts

    @property
    def kind(self) -> str:
        return self.index.get("kind") or (self.manifest or {}).get("kind") or "text"

    @property
    def splits(self) -> dict[str, dict]:
        return self.index.get("splits", {})

    def has_split(self, split: str) -> bool:
        return split in self.splits

    @property
    def vocab_size(self) -> int | None:
        return self.index.get("vocab_size")

    @property
    def tokenizer(self):
        """The tokenizer the data was tokenized with (``tokenizer/``, verified with the dataset)."""
        if self._tokenizer is None:
            from homeforge.models.io import load_tokenizer

            tok_dir = self.root / "tokenizer"
            if not tok_dir.is_dir():
                raise HomeforgeError(f"dataset {self.root} has no tokenizer/ directory", where=str(self.root),
                                     fix="re-run `homeforge prepare`; the tokenizer used for the data is stored with it")
            self._tokenizer = load_tokenizer(tok_dir)
        return self._tokenizer

    def labels(self) -> list[str] | None:
        """Label names (index = label id): ``labels.json``, else ``index.json``'s ``labels``; None if neither."""
        path = self._file("labels.json")
        if path.is_file():
            return list(json.loads(path.read_text(encoding="utf-8")))
        return list(self.index["labels"]) if self.index.get("labels") else None

    def resolve_split(self, split: str) -> str:
        """``split`` if its records exist; for the default ``val`` also ``validation``/``test``."""
        if (self.root / f"{split}.jsonl").is_file():
            return split
        if split == "val":  # the default: accept the other usual names of a held-out split
            for alt in ("validation", "test"):
                if (self.root / f"{alt}.jsonl").is_file():
                    return alt
        have = sorted(p.stem for p in self.root.glob("*.jsonl") if "." not in p.stem)
        raise HomeforgeError(f"dataset {self.root} has no {split!r} split ({split}.jsonl)", where=str(self.root),
                             fix=f"pass split=NAME; available: {', '.join(have) or 'none'}")

    # ------------------------------------------------------------------ reading

    def tokens(self, split: str):
        """The packed tokens of ``split``: a read-only memmap (an ``EncryptedArray`` if encrypted)."""
        if split not in self.splits:
            raise ArtifactError(f"dataset {self.root} has no {split!r} split", where=str(self.root),
                                fix=f"available splits: {', '.join(self.splits) or '(none)'}")
        info = self.splits[split]
        dtype = self.index.get("dtype", "uint16")
        if info.get("tokens", 0) == 0:
            return np.zeros(0, dtype=dtype)
        rel = info.get("file", f"{split}.bin")
        path = self._file(rel)
        from homeforge.security import crypto, encrypted_array

        if crypto.is_encrypted(path):  # decrypted chunk by chunk, each chunk authenticated (security/crypto.py)
            hashed = self.manifest is not None and rel in self.manifest["files"]
            # the file's hash was just checked: the whole-file tag pass on open would only repeat it
            return encrypted_array.EncryptedArray(path, dtype, length=info["tokens"], verify=not hashed)
        expected = int(info["tokens"]) * np.dtype(dtype).itemsize
        if path.stat().st_size != expected:  # no manifest to say so: still never a numpy traceback
            raise ArtifactError(f"{path} holds {path.stat().st_size} bytes, not the {info['tokens']} tokens of "
                                f"{dtype} its index records", where=str(path), fix="re-run `homeforge prepare`")
        return np.memmap(path, dtype=dtype, mode="r", shape=(int(info["tokens"]),))

    def jsonl(self, rel: str, limit: int | None = None, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The records of one JSONL file of the dataset (plain or encrypted), each with ``fields``."""
        path = self._file(rel)
        if not path.is_file():
            raise HomeforgeError(f"dataset {self.root} has no {rel}", where=str(self.root),
                                 fix=f"splits listed in index.json: {', '.join(self.splits) or '(none)'}")
        return read_jsonl(path, limit, fields)

    def token_records(self, split: str, fields: tuple[str, ...] = ("input_ids",), limit: int | None = None) -> list[dict]:
        """``{split}.tokens.jsonl`` (chat: input_ids + loss_mask; classification: input_ids + label)."""
        return self.jsonl(f"{split}.tokens.jsonl", limit, fields)

    def records(self, split: str, limit: int | None = None) -> list[dict]:
        """``{split}.jsonl``: the cleaned, scrubbed records exactly as training saw them."""
        return self.jsonl(f"{split}.jsonl", limit)


def read_jsonl(path: Path, limit: int | None = None, fields: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file (decrypted if encrypted); bad lines are named, never a traceback."""
    from homeforge.security.crypto import open_text  # plain or encrypted (security/crypto.py)

    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HomeforgeError(f"line {lineno} is not valid JSON: {exc.msg}", where=f"{path}:{lineno}",
                                     fix="re-create the dataset with `homeforge prepare`") from None
            missing = [k for k in fields if k not in rec] if isinstance(rec, dict) else list(fields)
            if missing:
                raise HomeforgeError(f"line {lineno} lacks {', '.join(missing)}", where=f"{path}:{lineno}",
                                     fix=f"each line needs {', '.join(fields)}; re-run `homeforge prepare`")
            rows.append(rec)
    return rows


def open_dataset(root: str | Path) -> DatasetReader:
    return DatasetReader.open(root)
