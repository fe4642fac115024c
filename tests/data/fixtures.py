"""Generated test inputs: mixed formats, injected duplicates, PII with valid and invalid checksums."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .pii_bench import id_check, luhn_digit

WORDS = ("river stone market ledger patient ward nurse bank loan audit machine sensor valve pump shift report "
         "policy claim record morning evening budget invoice clinic doctor engineer factory line batch quality "
         "review contract supplier order storage cabinet window garden letter summary figure table chapter").split()


def cn_id(seed: int) -> str:
    rng = random.Random(seed)
    body = f"{rng.randint(110000, 659999)}19{rng.randint(50, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    return body + id_check(body)


def bad_cn_id(seed: int) -> str:
    """Right shape, wrong check character, and not Luhn-valid either (so no detector may fire)."""
    good = cn_id(seed)
    for c in "0123456789":
        cand = good[:17] + c
        if c != good[17] and luhn_digit(cand[:-1]) != cand[-1]:
            return cand
    raise AssertionError("unreachable")


def card(seed: int, n: int = 16) -> str:
    rng = random.Random(seed)
    body = "62" + "".join(str(rng.randint(0, 9)) for _ in range(n - 3))
    return body + luhn_digit(body)


def bad_card(seed: int) -> str:
    good = card(seed)
    return good[:-1] + str((int(good[-1]) + 3) % 10)


def doc(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def minimal_pdf(text: str) -> bytes:
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def make_corpus(root: Path, seed: int = 0) -> dict:
    """Mixed-format text corpus; returns what was injected (for the assertions)."""
    import docx
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    base = [doc(rng) for _ in range(60)]
    inj: dict = {"exact": 0, "near": 0, "pii": {}, "bad_numbers": []}

    def pii(kind: str, n: int = 1):
        inj["pii"][kind] = inj["pii"].get(kind, 0) + n

    rows = []
    for i, d in enumerate(base[:40]):
        rows.append({"text": d, "id": i})
    # exact duplicates (case and spacing differ: still exact after normalisation)
    for i in (1, 2, 3):
        rows.append({"text": "  " + base[i].upper().replace(" ", "  "), "id": 100 + i})
        inj["exact"] += 1
    # near duplicates: a few words changed at the end
    for i in (5, 6):
        ws = base[i].split()
        ws[-2:] = ["altered", "tail."]
        rows.append({"text": " ".join(ws), "id": 200 + i})
        inj["near"] += 1
    # PII: valid ones must be replaced, invalid-checksum numbers must survive
    pii_texts = [
        (f"Patient id {cn_id(1)} was admitted. " + doc(rng, 30), "CN_ID"),
        (f"Card {card(2)} charged twice. " + doc(rng, 30), "BANK_CARD"),
        (f"Card {card(3)[:4]} {card(3)[4:8]} {card(3)[8:12]} {card(3)[12:]} on file. " + doc(rng, 30), "BANK_CARD"),
        ("Mail zhang.wei@hospital.example.cn about the ward. " + doc(rng, 30), "EMAIL"),
        ("Call 13912345678 after the shift. " + doc(rng, 30), "CN_MOBILE"),
        ("Office line 010-62345678 at the bank. " + doc(rng, 30), "CN_LANDLINE"),
        ("London desk +44 20 7946 0958 for the loan. " + doc(rng, 30), "PHONE"),
        ("Server 58.217.200.37 logs the pump. " + doc(rng, 30), "IPV4"),
        ("Host 2408:8207:85a3::8a2e:370:7334 handles audit. " + doc(rng, 30), "IPV6"),
        ("Fetch https://admin:s3cret@intranet.example.com/x daily. " + doc(rng, 30), "URL_CREDENTIALS"),
        ("Dr. Lin Wei reviewed the chart. " + doc(rng, 30), "NAME"),
    ]
    for t, kind in pii_texts:
        rows.append({"text": t, "id": len(rows)})
        pii(kind)
    for s in (7, 8):
        bad_id, bad_c = bad_cn_id(s), bad_card(s)
        inj["bad_numbers"] += [bad_id, bad_c]
        rows.append({"text": f"Reference {bad_id} and code {bad_c} are not personal. " + doc(rng, 30), "id": len(rows)})
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for r in rows[:30]:
            f.write(json.dumps(r) + "\n")
        f.write('{"text": "broken line\n')
        for r in rows[30:]:
            f.write(json.dumps(r) + "\n")
    inj["malformed_lines"] = 1
    # CSV with numeric columns, two of them perfectly correlated
    with open(root / "table.csv", "w", encoding="utf-8") as f:
        f.write("text,dose_mg,dose_g,ward\n")
        for i, d in enumerate(base[40:48]):
            f.write(f"\"{d}\",{i * 10 + 5},{(i * 10 + 5) / 1000},{(i * 7) % 5}\n")
    pq.write_table(pa.table({"text": base[48:52], "score": [1.0, 2.0, 3.0, 4.0]}), root / "part.parquet")
    (root / "page.html").write_text(f"<html><head><style>p{{}}</style></head><body><p>{base[52]}</p>"
                                    "<script>var x=1;</script></body></html>", encoding="utf-8")
    (root / "notes.md").write_text(base[53], encoding="utf-8")
    (root / "memo.pdf").write_bytes(minimal_pdf(base[54]))
    d = docx.Document()
    d.add_paragraph(base[55])
    d.save(root / "letter.docx")
    # bad files: broken PDF, unknown encoding, binary garbage
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (root / "latin.txt").write_bytes(("caf\xe9 " + base[56]).encode("latin-1"))
    (root / "garbage.txt").write_bytes(bytes(range(256)) * 4)
    inj["files_skipped"] = {"unreadable_file": 1, "unknown_encoding": 1, "binary_file": 1}
    inj["good_docs"] = 40 + 8 + 4 + 4 + len(pii_texts) + 2
    return inj


def bert_like_dir(root: Path, texts: list[str], with_model: bool = False) -> Path:
    """A BERT-like encoder directory built here: WordPiece tokenizer with [CLS]/[SEP]/[PAD]/[UNK]/[MASK], no EOS
    (and, if asked, a tiny randomly initialised BertForMaskedLM)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                             pad_token="[PAD]", mask_token="[MASK]", model_max_length=64)
    root.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(root))
    if with_model:
        import torch
        from transformers import BertConfig, BertForMaskedLM

        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64,
                                   pad_token_id=fast.pad_token_id)).save_pretrained(str(root))
    return root
