"""Run llama.cpp's convert_hf_to_gguf.py on one model directory for several outtypes in one process.

usage: python run_converter.py CONVERT_HF_TO_GGUF.py MODEL_DIR OUT_DIR PRE_NAME OUTTYPE...

The converter names a BPE tokenizer's pre-tokenizer by looking up a hash of its behaviour in
a table of published tokenizers and refuses any other. A homeforge-trained tokenizer is never
in that table, so where the converter finds no name this gives it PRE_NAME (homeforge's
behaviour-based choice, checked separately against llama.cpp's tokenizer); every other part
of the conversion is the converter's own.
"""

import runpy
import sys
from pathlib import Path

script, model_dir, out_dir, pre, *outtypes = sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
sys.path.insert(0, str(Path(script).parent / "gguf-py"))
import conversion.base as base  # noqa: E402

_known = base.TextModel.get_vocab_base_pre


def _pre(self, tokenizer):
    try:
        return _known(self, tokenizer)
    except NotImplementedError:
        return pre


base.TextModel.get_vocab_base_pre = _pre
main = runpy.run_path(script, run_name="converter")["main"]
for outtype in outtypes:
    sys.argv = [script, model_dir, "--outtype", outtype, "--outfile", str(Path(out_dir) / f"{outtype}.gguf")]
    main()
