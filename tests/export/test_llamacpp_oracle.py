"""llama.cpp's own converter as the oracle for our GGUF files.

``convert_hf_to_gguf.py`` (pure Python, from the llama-cpp-python sdist, fetched with pip into
the llama.cpp cache dir once and reused) converts the same tiny models as our exporter; every
metadata key llama.cpp reads and every tensor (name, shape, type, bytes) must be equal, for
f32, f16 and q8_0. The tokenizer is the BPE tokenizer ``homeforge prepare`` trains.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from homeforge.export import pretok
from homeforge.export.gguf import pre_tokenizer, write_gguf

OUTTYPES = ("f32", "f16", "q8_0")
# descriptive keys llama.cpp does not read for inference (name, size label): free to differ
DESCRIPTIVE = {"general.name", "general.size_label", "general.basename", "general.finetune", "general.version"}
MODELS = ("llama_dir", "qwen2_dir", "qwen2moe_dir", "deepseek_v3_dir")


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module", params=MODELS)
def converted(request, llamacpp_source, tmp_path_factory):
    """(model dir, our files, the converter's files) for one tiny model, all three outtypes."""
    from transformers import AutoTokenizer

    from homeforge.export.common import load_source

    model_dir: Path = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(f"oracle-{request.param}")
    src = load_source(model_dir)
    for t in OUTTYPES:
        write_gguf(src.model, src.tokenizer, out / f"ours-{t}.gguf", t, model_dir.name)
    # the name the converter gets for a tokenizer its hash table does not know: ours, for the
    # tokenizer as the converter loads it (checked against llama.cpp's tokenizer in test_llamacpp_runtime)
    pre = pre_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    (out / "conv").mkdir()
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("run_converter.py")),
                        str(llamacpp_source / "convert_hf_to_gguf.py"), str(model_dir), str(out / "conv"), pre,
                        *OUTTYPES], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return model_dir, src.model.config, out


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_metadata_and_tensors_equal_the_converters(converted, outtype):
    from gguf import GGUFReader

    _, config, out = converted
    ours_r, theirs_r = GGUFReader(str(out / f"ours-{outtype}.gguf")), GGUFReader(str(out / "conv" / f"{outtype}.gguf"))
    ours, theirs = _fields(ours_r), _fields(theirs_r)
    arch = theirs["general.architecture"]
    different = {k: (ours.get(k, "<missing>"), v) for k, v in theirs.items()
                 if k not in DESCRIPTIVE and ours.get(k, "<missing>") != v}
    assert not different, {k: (repr(a)[:200], repr(b)[:200]) for k, (a, b) in different.items()}
    # keys only we write restate llama.cpp's defaults for this model (same meaning, explicit)
    extra = set(ours) - set(theirs) - DESCRIPTIVE - {"general.source.homeforge_version"}
    assert extra <= {f"{arch}.attention.key_length", f"{arch}.attention.value_length",
                     f"{arch}.rope.dimension_count", f"{arch}.vocab_size"}, extra
    head_dim = ours[f"{arch}.embedding_length"] // ours[f"{arch}.attention.head_count"]
    for k in extra - {f"{arch}.vocab_size"}:
        assert ours[k] == head_dim, k
    if f"{arch}.vocab_size" in extra:
        assert ours[f"{arch}.vocab_size"] == len(ours["tokenizer.ggml.tokens"])

    ours_t = {t.name: t for t in ours_r.tensors}
    theirs_t = {t.name: t for t in theirs_r.tensors}
    assert set(ours_t) == set(theirs_t)
    for name, t in theirs_t.items():
        o = ours_t[name]
        assert (o.tensor_type.name, o.shape.tolist()) == (t.tensor_type.name, t.shape.tolist()), name
        assert np.asarray(o.data).tobytes() == np.asarray(t.data).tobytes(), f"{name} ({outtype}) differs"


def test_pre_tokenizer_table_is_the_converters(llamacpp_source):
    """pretok.KNOWN and CHECK_TEXT are the converter's get_vocab_base_pre table and text, verbatim."""
    body = (llamacpp_source / "conversion" / "base.py").read_text(encoding="utf-8")
    body = body[body.index("Marker: Start get_vocab_base_pre"):body.index("Marker: End get_vocab_base_pre")]
    pairs = re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body)
    assert len(pairs) == body.count("chkhsh ==") > 50
    assert dict(pairs) == pretok.KNOWN  # a hash listed twice keeps its last name, as in the converter
    namespace: dict = {}
    exec(re.search(r"chktxt = .*", body).group(0), namespace)  # the converter's literal, evaluated
    assert namespace["chktxt"] == pretok.CHECK_TEXT
