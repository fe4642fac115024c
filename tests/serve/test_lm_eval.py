"""lm-evaluation-harness `local-completions` scores loglikelihoods through the server.

Slow (imports lm-eval + datasets); skipped when lm-eval is not installed.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from .conftest import running_server

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "The function returns the number of", "choices": [" items", " apples", " zebras"], "answer": 0},
    {"question": "Raise ValueError if the argument is", "choices": [" negative", " purple"], "answer": 0},
    {"question": "This module provides", "choices": [" functions", " a", " nothing at all"], "answer": 1},
]


def test_lm_eval_local_completions_matches_direct_scores(serve_cfg, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval[api] extras are needed for local-completions")
    from lm_eval.tasks import TaskManager

    from homeforge.models.io import load_causal_lm

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hf_tiny_mc.yaml").write_text(f"""task: hf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    with running_server(serve_cfg) as (base, _):
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=tiny,base_url={base}/v1/completions,tokenizer={serve_cfg.model_dir},"
                       f"tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks=["hf_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    model, tok = load_causal_lm(serve_cfg.model_dir)
    samples = out["samples"]["hf_tiny_mc"]
    assert len(samples) == len(DOCS)
    for s in samples:
        doc = s["doc"]
        for choice, resp in zip(doc["choices"], s["resps"], strict=True):
            ctx = tok(doc["question"])["input_ids"]
            whole = tok(doc["question"] + choice)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
            want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            got = resp[0][0]
            assert math.isclose(got, want, abs_tol=1e-3), (doc, choice, got, want)
    assert 0.0 <= out["results"]["hf_tiny_mc"]["acc,none"] <= 1.0
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
