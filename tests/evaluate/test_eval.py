"""`homeforge eval` on tiny models: sliding-window perplexity, reports, comparison, gates, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from homeforge.config import EvalConfig, load_config
from homeforge.errors import HomeforgeError
from homeforge.evaluate import lm, robustness
from homeforge.evaluate import run as R

from .helpers import train_debug_model, write_dataset

QUIET = Console(quiet=True)
FAST = ["max_examples=24", "generation.max_examples=3", "generation.max_new_tokens=6", "generation.prompt_tokens=8",
        "robustness.max_examples=6", "bootstrap_resamples=500"]


@pytest.fixture(scope="module")
def models(tiny_dataset, tiny_tokenizer, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evalmodels")
    trained = train_debug_model(tiny_dataset, tiny_tokenizer, root / "trained", steps=40)
    weak = train_debug_model(tiny_dataset, tiny_tokenizer, root / "weak", steps=3, seed=1)
    return trained, weak


@torch.no_grad()
def _full_nll(model, ids):
    x = torch.tensor([ids])
    logp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    return float(-logp.gather(-1, x[0, 1:, None]).sum())


def test_windows_score_every_position_once():
    for n in (1, 2, 7, 16, 17, 100):
        for context, stride in ((8, 4), (8, 7), (16, 16), (5, 1)):
            covered = []
            for begin, end, k in lm.windows_for(list(range(n)), context, stride):
                assert end - begin <= context and k <= end - begin - (0 if begin else 1)
                covered += list(range(end - k, end))
            assert covered == list(range(1, n)), (n, context, stride)


def test_sliding_window_equals_full_context_when_it_fits(models, tiny_tokenizer):
    from homeforge.models.io import load_causal_lm

    model, _ = load_causal_lm(models[0])
    docs = [[0, *range(5, 5 + n)] for n in (3, 40, 17)]
    nll, count = lm.document_nll(model, docs, context=64, stride=32, batch_size=2)
    for i, ids in enumerate(docs):
        assert count[i] == len(ids) - 1
        assert nll[i] == pytest.approx(_full_nll(model, ids), rel=1e-4)
    # a short window: each window's scored tail matches a manual computation
    ids = docs[1]
    nll_w, _ = lm.document_nll(model, [ids], context=16, stride=8, batch_size=1)
    manual = 0.0
    with torch.no_grad():
        for begin, end, k in lm.windows_for(ids, 16, 8):
            x = torch.tensor([ids[begin:end]])
            logp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            manual += float(-logp.gather(-1, x[0, 1:, None])[-k:].sum())
    assert nll_w[0] == pytest.approx(manual, rel=1e-4)
    assert nll_w[0] != pytest.approx(nll[1], rel=1e-6)  # shorter context really changes the scores


def test_perturbations_are_seeded():
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    assert robustness.perturb(text, "char", 0.0) == text and robustness.perturb(text, "word", 0.0) == text
    a = robustness.perturb(text, "char", 0.2, seed=3)
    assert a == robustness.perturb(text, "char", 0.2, seed=3) and a != text
    assert robustness.perturb(text, "char", 0.2, seed=4) != a
    w = robustness.perturb(text, "word", 0.3, seed=1)
    assert w != text and set(w.split()) <= set(text.split())


def test_eval_text_with_baseline_report_and_gates(models, tiny_dataset, tmp_path):
    trained, weak = models
    cfg = load_config(EvalConfig, overrides=FAST + ["gates.max_ppl=100000", "gates.max_regression=0.01"])
    res = R.run(trained, tiny_dataset, cfg, weak, tmp_path / "ev", False, QUIET)
    m, b = res["model"], res["baseline"]
    assert m["perplexity"]["ppl"] < b["perplexity"]["ppl"] < 600  # the longer-trained model is better
    assert m["perplexity"]["tokens"] == b["perplexity"]["tokens"] > 0
    assert 0 < m["perplexity"]["bits_per_byte"] < 10
    assert set(m["generation"]) >= {"bleu", "rouge_l", "exact_match"} and m["speed"]["tokens_per_s"] > 0
    assert m["robustness"]["char"]["ppl_ratio"] > 0.5
    rg = m["robustness"]["word"]["generation"]
    assert rg["n"] == 3 and rg["clean_same_examples"]["rouge_l"] == pytest.approx(m["generation"]["rouge_l"])
    c = res["comparison"]["perplexity"]
    assert c["delta"] < 0 and c["p_value"] < 0.05  # model (b) has lower loss than the baseline (a)
    assert all(g["passed"] for g in res["gates"])
    out = tmp_path / "ev"
    for f in ("eval.json", "eval.md", "length_vs_loss.png", "homeforge.json"):
        assert (out / f).is_file(), f
    assert (out / "length_vs_loss.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "eval.md").read_text()
    assert "paired bootstrap" in md and "PASS `max_regression`" in md

    # the weaker model against the better one as baseline: the regression gate fails, exit code 3
    cfg2 = load_config(EvalConfig, overrides=FAST + ["gates.max_regression=0.01", "robustness.enabled=false",
                                                     "generation.enabled=false"])
    with pytest.raises(R.GateError, match="max_regression") as exc:
        R.run(weak, tiny_dataset, cfg2, trained, tmp_path / "ev2", False, QUIET)
    assert exc.value.exit_code == 3
    saved = json.loads((tmp_path / "ev2" / "eval.json").read_text())  # the report is still written
    assert saved["gates"][0]["passed"] is False

    cfg3 = load_config(EvalConfig, overrides=FAST + ["gates.max_ppl=1.5", "robustness.enabled=false",
                                                     "generation.enabled=false"])
    with pytest.raises(R.GateError, match="max_ppl"):
        R.run(trained, tiny_dataset, cfg3, None, tmp_path / "ev3", False, QUIET)


def test_eval_classifier_matches_direct_computation(tiny_tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    from homeforge.models.presets import preset_config

    tok = tiny_tokenizer
    cfg = preset_config("debug", len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    cfg.num_labels = 3
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(cfg).eval()
    clf.config.architectures = ["LlamaForSequenceClassification"]
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    texts = [f"ticket {i}: the printer on floor {i % 5} is {'broken' if i % 3 else 'fine'} again" for i in range(30)]
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(texts)]
    data = write_dataset(tmp_path / "cls", "classification", {"val": rows}, tok, labels=["hw", "sw", "net"])
    ecfg = load_config(EvalConfig, overrides=["bootstrap_resamples=200", "gates.min_accuracy=0.0"])
    res = R.run(tmp_path / "clf", data, ecfg, None, tmp_path / "ev", False, QUIET)
    c = res["model"]["classification"]
    with torch.no_grad():
        preds = [int(clf(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]))
                     .logits.argmax()) for t in texts]
    assert c["accuracy"] == pytest.approx(sum(p == r["label"] for p, r in zip(preds, rows, strict=True)) / 30)
    assert sum(map(sum, c["confusion_matrix"])) == 30 and set(c["per_class"]) == {"hw", "sw", "net"}
    assert not math.isnan(c["auc_pr"]) and 0 <= c["confusion_entropy"]["normalized"] <= 1
    assert set(res["model"]["robustness"]) == {"char", "word"}
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()
    # a causal LM on a classification dataset, and a classifier on a text dataset: clear errors
    with pytest.raises(HomeforgeError, match="causal language model but the dataset is a classification"):
        R.load_model(_lm_dir(tmp_path, tok), "classification")
    with pytest.raises(HomeforgeError, match="sequence classifier"):
        R.load_model(tmp_path / "clf", "text")


def _lm_dir(tmp_path, tok):
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config

    out = tmp_path / "lm"
    save_model_dir(build_model(preset_config("debug", len(tok), eos_token_id=tok.eos_token_id), seed=0), tok, out)
    return out


def test_eval_chat_dataset(models, tiny_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(6)]
    data = write_dataset(tmp_path / "chat", "chat", {"val": rows}, tiny_tokenizer)
    cfg = load_config(EvalConfig, overrides=["generation.max_new_tokens=4", "bootstrap_resamples=200"])
    res = R.run(models[0], data, cfg, None, tmp_path / "ev", False, QUIET)["model"]
    assert res["kind"] == "chat" and res["perplexity"]["docs"] == 6
    # only the reply tokens (and the closing EOS) are scored
    expected = sum(len(tiny_tokenizer(f"It is {2 * i}.", add_special_tokens=False)["input_ids"]) + 1 for i in range(6))
    assert res["perplexity"]["tokens"] == expected
    assert res["generation"]["n"] == 6 and set(res["robustness"]) == {"char", "word"}
    assert res["robustness"]["char"]["generation"]["n"] == 6


def test_bad_inputs(models, tiny_dataset, tmp_path):
    cfg = load_config(EvalConfig, overrides=FAST)
    with pytest.raises(HomeforgeError, match="does not exist"):
        R.run(tmp_path / "nope", tiny_dataset, cfg, None, tmp_path / "o", False, QUIET)
    with pytest.raises(HomeforgeError, match="no 'nosuch' split"):
        R.run(models[0], tiny_dataset, load_config(EvalConfig, overrides=["split=nosuch"]), None, tmp_path / "o",
              False, QUIET)
    assert not (tmp_path / "o").exists()
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((models[0] / f).read_bytes())
    with pytest.raises(HomeforgeError, match="no tokenizer"):
        R.run(notok, tiny_dataset, cfg, None, tmp_path / "o", False, QUIET)
    assert not (tmp_path / "o").exists()


def test_cli_eval_gate_exit_code_and_help(models, tiny_dataset, tmp_path):
    import subprocess
    import sys

    def hf(*args):
        return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = hf("eval", "--help")
    assert r.returncode == 0 and "Examples" in r.stdout
    fast = [*FAST, "robustness.enabled=false", "generation.enabled=false", "threads=1"]
    r = hf("eval", models[1], "--data", tiny_dataset, "--baseline", models[0], "-o", tmp_path / "e",
           *fast, "gates.max_regression=0.01")
    assert r.returncode == 3, r.stderr
    assert "max_regression" in r.stderr and "FAIL" in r.stdout
    assert (tmp_path / "e" / "eval.md").is_file()
    r = hf("eval", models[0], "--data", tmp_path / "nodata", "-o", tmp_path / "bad", *fast)
    assert r.returncode == 2 and "does not exist" in " ".join(r.stderr.split()) and not (tmp_path / "bad").exists()
