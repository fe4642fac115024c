"""Metric functions against the reference libraries on fixed inputs, and known p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from homeforge.evaluate import metrics as M

LABELS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def cls_case():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    y[:5] = 3  # make sure every class occurs
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = scores.argmax(1)
    return y, pred, scores


def test_classification_matches_sklearn(cls_case):
    from sklearn import metrics as skm

    y, pred, scores = cls_case
    out = M.classification_metrics(y, pred, 4, scores=scores, labels=LABELS)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for i, name in enumerate(LABELS):
        assert out["per_class"][name]["precision"] == pytest.approx(p[i])
        assert out["per_class"][name]["recall"] == pytest.approx(r[i])
        assert out["per_class"][name]["f1"] == pytest.approx(f[i])
        assert out["per_class"][name]["support"] == s[i]
        assert out["per_class"][name]["auc_pr"] == pytest.approx(skm.average_precision_score(y == i, scores[:, i]))
    assert out["auc_pr"] == pytest.approx(skm.average_precision_score(np.eye(4)[y], scores, average="macro"))
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(4)).tolist()


def test_macro_f1_with_missing_class_matches_sklearn():
    from sklearn.metrics import f1_score

    y, pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 1]
    assert M.classification_metrics(y, pred, 4)["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))


def test_confusion_entropy_known_values():
    perfect = M.confusion_entropy(np.diag([10, 10, 10, 10]))
    assert perfect["conditional_bits"] == pytest.approx(0.0)
    assert perfect["joint_bits"] == pytest.approx(2.0)
    uniform = M.confusion_entropy(np.full((4, 4), 5))
    assert uniform["conditional_bits"] == pytest.approx(2.0)
    assert uniform["normalized"] == pytest.approx(1.0)


def test_rouge_l_matches_rouge_score_on_english():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("the cat sat on the mat", "the cat is on the mat"),
             ("Return the number of items, or None.", "return number of the items"),
             ("completely different", "nothing in common here"),
             ("", "empty prediction"),
             ("A B C D E F", "f e d c b a x")]
    for pred, ref in pairs:
        assert M.rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_rouge_l_counts_unspaced_chinese():
    # LCS of 今天天气很好 / 今天天气不错 is 今天天气 (4 of 6 characters each way): P = R = F = 2/3
    assert M.rouge_l("今天天气很好", "今天天气不错") == pytest.approx(2 / 3)
    # mixed text: words and characters (模 型 model 很 好): 4 of 5 tokens shared in order
    assert M.rouge_l("模型 model 很好", "模型 model 很差") == pytest.approx(0.8)
    assert M.rouge_l("完全不同", "毫无关系") == 0.0


def test_generation_metrics_bleu_and_exact_match():
    import sacrebleu

    preds = ["the cat sat on the mat", "Paris.", "a quick brown fox"]
    refs = ["the cat sat on the mat", "paris", "the slow brown dog"]
    out = M.generation_metrics(preds, refs)
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert out["exact_match"] == pytest.approx(2 / 3)  # case, punctuation and articles are normalised
    assert out["per_example"]["bleu"][0] == pytest.approx(100.0)
    assert out["per_example"]["rouge_l"][0] == pytest.approx(1.0)


def test_generation_metrics_on_chinese_use_sacrebleus_zh_tokenizer():
    import sacrebleu

    preds, refs = ["今天天气很好。", "北京是中国的首都"], ["今天天气不错。", "北京是中国的首都。"]
    out = M.generation_metrics(preds, refs)
    assert out["bleu_tokenizer"] == "zh"
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score)
    assert out["bleu"] > 30  # with the default 13a tokeniser each sentence is one token and BLEU is ~0
    assert out["exact_match"] == pytest.approx(0.5)  # full-width punctuation is normalised away too


def test_mcnemar_known_exact_p_value():
    # 10 pairs only b gets right, 2 only a gets right, 88 agree: exact two-sided binomial
    a = np.array([0] * 10 + [1] * 2 + [1] * 60 + [0] * 28, dtype=bool)
    b = np.array([1] * 10 + [0] * 2 + [1] * 60 + [0] * 28, dtype=bool)
    out = M.mcnemar(a, b)
    assert out["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.03857
    assert out["effect_size"] == pytest.approx(5.0)
    assert out["delta"] == pytest.approx(0.08)


def test_mcnemar_chi2_known_value():
    a = np.array([0] * 40 + [1] * 20 + [1] * 40, dtype=bool)
    b = np.array([1] * 40 + [0] * 20 + [1] * 40, dtype=bool)
    out = M.mcnemar(a, b)  # chi2 = (|20-40|-1)^2 / 60 = 6.0167, p = 0.01418
    assert out["statistic"] == pytest.approx(361 / 60)
    assert out["p_value"] == pytest.approx(0.014180, abs=2e-5)


def test_paired_bootstrap_matches_normal_theory_and_null():
    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    d = rng.normal(size=400)
    d = (d - d.mean()) / d.std(ddof=1) * 1.0 + 0.1  # mean 0.1, sd 1: z = 0.1 * sqrt(400) = 2.0
    out = M.paired_bootstrap(a, a + d, n_resamples=20_000, seed=0)
    assert out["delta"] == pytest.approx(0.1)
    assert out["effect_size"] == pytest.approx(0.1)
    # two-sided normal p for z = 2 is 0.0455; the bootstrap's sd uses ddof=0 so z is a hair larger
    assert out["p_value"] == pytest.approx(0.0455, abs=0.006)
    assert out["ci95"][0] < 0.1 < out["ci95"][1]
    same = M.paired_bootstrap(a, a, n_resamples=1000)
    assert same["p_value"] == 1.0 and same["delta"] == 0.0
    assert not math.isnan(M.paired_bootstrap(a, a + 5, n_resamples=1000)["p_value"])
    assert M.paired_bootstrap(a, a + 5 + 0.01 * d, n_resamples=1000)["p_value"] == pytest.approx(1 / 1001)
