"""Tokenizers for `homeforge prepare`: train a byte-level BPE or load a model's; tokenize the splits.

The trained tokenizer loads with ``AutoTokenizer.from_pretrained(dir)`` and carries a
ChatML chat template, so SFT and serving can use it without homeforge. A model's own
tokenizer may be a decoder's (EOS needed for packed text and chat) or a BERT-like
encoder's ([CLS]/[SEP]/[PAD], no EOS: enough for classification).

Long texts are tokenized piece by piece (``text_pieces``: cuts where the tokenization of
either side cannot change), so one huge record costs memory for one piece, not for the
whole encoding (a 50 MB line used to take gigabytes here).
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from homeforge.data.clean import PROSE_PUNCT, last_match
from homeforge.errors import HomeforgeError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, show_progress: bool = False):
    """Train a byte-level BPE tokenizer on ``texts``; return a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    return wrap(tok)


def wrap(tok):
    """Wrap a `tokenizers.Tokenizer` with our special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _batched(texts: Iterable[str], size: int = 1000, budget: int | None = None) -> Iterator[list[str]]:
    """Lists of at most ``size`` texts and (about) ``budget`` characters."""
    budget = budget or BATCH_CHARS
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) >= size or chars >= budget:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------- long texts in bounded memory

_AFTER_PUNCT = re.compile(f"[{PROSE_PUNCT}](?=[^\\W_])")
PIECE_CHARS = 1 << 16  # a text longer than this is encoded piece by piece
BATCH_CHARS = 1 << 18  # characters handed to the tokenizer at once


def _cut(text: str, lo: int, hi: int) -> int:
    """A cut position in (lo, hi] that does not change the tokenization of either side, else ``hi``.

    Before a single space between two non-spaces (a pre-token boundary for byte-level BPE
    and WordPiece), or after punctuation followed by a letter or digit (unspaced CJK).
    """
    p = text.rfind(" ", lo + 1, hi)
    while p > lo:
        if not text[p - 1].isspace() and not text[p + 1].isspace():
            return p
        p = text.rfind(" ", lo + 1, p)
    last = last_match(_AFTER_PUNCT, text, lo, hi)
    return last.end() if last is not None else hi


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters (one piece if it is short; ``""`` gives ``""``)."""
    if len(text) <= size:
        yield text
        return
    start = 0
    while len(text) - start > size:
        end = _cut(text, start + size // 2, start + size)
        yield text[start:end]
        start = end
    yield text[start:]


def encode_stream(tok, texts: Iterable[str], piece: int = PIECE_CHARS, budget: int = BATCH_CHARS) -> Iterator[tuple[int, list[int]]]:
    """(document index, token ids of one piece) in order, without special tokens.

    Every document yields at least one piece; a long one yields several, so neither the
    tokenizer nor this process ever holds the encoding of more than ``budget`` characters.
    """
    batch: list[str] = []
    owner: list[int] = []
    size = 0
    for d, text in enumerate(texts):
        for p in text_pieces(text, piece):
            batch.append(p)
            owner.append(d)
            size += len(p)
            if size >= budget or len(batch) >= 1000:
                yield from zip(owner, tok(batch, add_special_tokens=False)["input_ids"], strict=True)
                batch, owner, size = [], [], 0
    if batch:
        yield from zip(owner, tok(batch, add_special_tokens=False)["input_ids"], strict=True)


def bounded_prefix(tok, text: str, max_tokens: int, piece: int = PIECE_CHARS) -> str:
    """The start of ``text`` that still holds more than ``max_tokens`` tokens (all of it if short)."""
    if len(text) <= piece:
        return text
    n, end = 0, 0
    for p in text_pieces(text, piece):
        end += len(p)
        n += len(tok(p, add_special_tokens=False)["input_ids"])
        if n > max_tokens + 8:
            break
    return text[:end]


# --------------------------------------------------------------------------- prepare's tokenize pass


def iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def record_text(rec: dict) -> str:
    if "messages" in rec:
        return "\n".join(m["content"] for m in rec["messages"])
    return rec["text"]


def for_dataset(cfg, dest: Path, console):
    """The dataset's tokenizer: ``tokenizer.from_dir``'s (checked for what ``cfg.kind`` needs) or a BPE trained on train."""
    if cfg.tokenizer.from_dir:
        from homeforge.models.io import load_tokenizer

        src = cfg.tokenizer.from_dir
        tok = load_tokenizer(src)
        if cfg.kind == "chat" and not tok.chat_template:
            raise HomeforgeError(f"the tokenizer in {src} has no chat template", where=src,
                                 fix="use a chat model directory, or leave tokenizer.from_dir unset")
        if cfg.kind != "classification" and tok.eos_token_id is None:
            raise HomeforgeError(f"the tokenizer in {src} has no EOS token; kind={cfg.kind} needs one to mark where a "
                                 "document or turn ends", where=src,
                                 fix="use a decoder's tokenizer (with an eos_token); encoders without EOS (BERT-like) "
                                     "suit kind=classification")
        if cfg.kind == "classification" and tok.pad_token_id is None and tok.eos_token_id is None:
            raise HomeforgeError(f"the tokenizer in {src} has neither a PAD nor an EOS token; classification batches "
                                 "need one to pad with", where=src, fix="use a tokenizer that defines pad_token")
        return tok
    texts = (p for rec in iter_jsonl(dest / "train.jsonl") for p in text_pieces(record_text(rec)))
    with console.status(f"training a {cfg.tokenizer.vocab_size}-token byte-level BPE on the train split"):
        return train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)


def classification_max_length(cfg, tok) -> int | None:
    """``tokenizer.max_length``, else the tokenizer's own limit (512 for BERT-like encoders) if it states one."""
    if cfg.tokenizer.max_length:
        return cfg.tokenizer.max_length
    limit = getattr(tok, "model_max_length", None)
    return int(limit) if limit and limit < 1_000_000 else None


def _batches(it, size):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _text_split(tok, path: Path, dest: Path, split: str, vocab: int, lengths: array, bar, task) -> dict:
    from homeforge.data.shards import ShardWriter

    w = ShardWriter(dest, split, vocab, tok.eos_token_id)
    cur, n = -1, 0
    for d, ids in encode_stream(tok, (r["text"] for r in iter_jsonl(path))):
        if d != cur:
            if cur >= 0:
                w.end_doc()
                lengths.append(n)
                bar.advance(task, 1)
            w.start_doc()
            cur, n = d, 0
        w.extend(ids)
        n += len(ids)
    if cur >= 0:
        w.end_doc()
        lengths.append(n)
        bar.advance(task, 1)
    return w.close()


def tokenize_splits(cfg, tok, dest: Path, counts: dict, label_names: list[str], bar, splits=("train", "val", "test")) -> dict:
    """Stream the split files into token shards (text) or tokenized records (chat, classification)."""
    from homeforge.data.shards import token_dtype

    vocab = len(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    index = {"format": "packed-tokens-v1" if cfg.kind == "text" else "tokenized-records-v1", "kind": cfg.kind,
             "dtype": np.dtype(token_dtype(vocab)).name, "vocab_size": vocab, "eos_id": tok.eos_token_id,
             "pad_id": pad, "splits": {}}
    if cfg.kind == "classification":
        index["labels"] = label_names
        for name in ("cls_token_id", "sep_token_id"):
            if getattr(tok, name, None) is not None:
                index[name.replace("_token_id", "_id")] = getattr(tok, name)
        (dest / "labels.json").write_text(json.dumps(label_names, ensure_ascii=False))
    label_id = {name: i for i, name in enumerate(label_names)}
    max_len = classification_max_length(cfg, tok) if cfg.kind == "classification" else cfg.tokenizer.max_length
    tokens = {}
    for split in splits:
        path = dest / f"{split}.jsonl"
        if not counts.get(split):
            path.unlink(missing_ok=True)
            continue
        n_rec = sum(1 for _ in open(path, encoding="utf-8"))
        task = bar.task(f"tokenize {split}", total=n_rec)
        lengths = array("q")
        if cfg.kind == "text":
            info = _text_split(tok, path, dest, split, vocab, lengths, bar, task)
        else:
            from homeforge.data.chat import tokenize_chat

            with open(dest / f"{split}.tokens.jsonl", "w", encoding="utf-8") as out:
                for batch in _batches(iter_jsonl(path), 500):
                    if cfg.kind == "chat":
                        for r in batch:
                            ids, mask = tokenize_chat(tok, r["messages"], max_len)
                            out.write(json.dumps({"input_ids": ids, "loss_mask": mask}) + "\n")
                            lengths.append(len(ids))
                    else:
                        texts = [bounded_prefix(tok, r["text"], max_len) if max_len else r["text"] for r in batch]
                        enc = tok(texts, add_special_tokens=True, truncation=max_len is not None, max_length=max_len)
                        for r, ids in zip(batch, enc["input_ids"], strict=True):
                            out.write(json.dumps({"input_ids": ids, "label": label_id[r["label"]]}) + "\n")
                            lengths.append(len(ids))
                    bar.advance(task, len(batch))
            info = {"file": f"{split}.tokens.jsonl", "records": len(lengths), "tokens": int(sum(lengths))}
        info["jsonl"] = f"{split}.jsonl"
        index["splits"][split] = info
        tokens[split] = np.asarray(lengths, dtype=np.int64)
    if cfg.kind == "classification" and max_len:
        index["max_length"] = max_len
    (dest / "index.json").write_text(json.dumps(index, indent=2))
    return {"index": index, "tokens": tokens}
