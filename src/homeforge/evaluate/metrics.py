"""Metric functions: classification, generation text overlap, and paired significance tests.

The metrics come from the libraries people cite: scikit-learn (accuracy, precision/recall/F1,
confusion matrix, average precision), sacrebleu (BLEU) and rouge-score (ROUGE-L). Text is
tokenised so that unspaced Chinese, Japanese and Korean count too: rouge-score's default
tokeniser keeps only ``[a-z0-9]`` (a Chinese sentence scores 0), so ROUGE uses one token per
CJK character and lower-cased alphanumeric words elsewhere; BLEU uses sacrebleu's ``zh``
tokeniser when the references contain CJK text, else its default ``13a``.
"""

from __future__ import annotations

import math
import re
import unicodedata

import numpy as np

# --------------------------------------------------------------------------- classification


def confusion_entropy(cm: np.ndarray) -> dict[str, float]:
    """Entropies (bits) of a confusion matrix.

    ``joint``: H(true, pred) of the normalised matrix; ``conditional``: H(pred | true),
    0 for a classifier that always maps a class to one prediction, log2(K) for one that
    guesses uniformly. ``normalized``: conditional / log2(K), in [0, 1].
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    k = cm.shape[0]
    if total == 0:
        return {"joint_bits": float("nan"), "conditional_bits": float("nan"), "normalized": float("nan")}
    p = cm / total
    nz = p[p > 0]
    joint = float(-(nz * np.log2(nz)).sum())
    row = p.sum(axis=1)
    nzr = row[row > 0]
    h_true = float(-(nzr * np.log2(nzr)).sum())
    cond = joint - h_true
    return {"joint_bits": joint, "conditional_bits": cond, "normalized": cond / math.log2(k) if k > 1 else 0.0}


def classification_metrics(y_true, y_pred, n_classes: int, scores=None, labels: list[str] | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support, AUC-PR (with ``scores``),
    confusion matrix and its entropy. ``scores``: [n, n_classes] class probabilities."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = labels or [str(i) for i in range(n_classes)]
    every = list(range(n_classes))
    cm = skm.confusion_matrix(y_true, y_pred, labels=every)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=every, zero_division=0)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        # macro average over the labels seen in y_true or y_pred (scikit-learn's default)
        "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)) if len(y_true) else float("nan"),
        "per_class": {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                  "support": int(support[i])} for i in every},
        "confusion_matrix": cm.tolist(),
        "labels": labels,
        "confusion_entropy": confusion_entropy(cm),
    }
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        aps = [float(skm.average_precision_score(y_true == i, scores[:, i])) if (y_true == i).any() else float("nan")
               for i in every]
        valid = [a for a in aps if not math.isnan(a)]
        out["auc_pr"] = float(np.mean(valid)) if valid else float("nan")
        for i, a in enumerate(aps):
            out["per_class"][labels[i]]["auc_pr"] = a
    return out


# --------------------------------------------------------------------------- generation

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_CJK_RE = re.compile(rf"[{_CJK}]")


class TextTokenizer:
    """rouge-score's tokeniser interface: lower-cased alphanumeric words, one token per CJK character."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, LCS based, beta = 1) of one pair."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=TextTokenizer())
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lowercase, drop punctuation (any script), English
    articles and extra spaces."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def bleu_tokenizer(references: list[str]) -> str:
    """sacrebleu's ``zh`` tokeniser when the references hold CJK text (it also splits spaced words), else ``13a``."""
    return "zh" if any(_CJK_RE.search(r) for r in references) else "13a"


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu), mean ROUGE-L F, exact match; plus per-example scores."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    tok = bleu_tokenizer(references)
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tok)
    per_bleu = [sacrebleu.sentence_bleu(p, [r], tokenize=tok).score for p, r in zip(predictions, references, strict=True)]
    per_rouge = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    per_em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    n = max(1, len(predictions))
    return {"n": len(predictions), "bleu": float(bleu.score), "bleu_tokenizer": tok,
            "rouge_l": float(sum(per_rouge) / n), "exact_match": float(sum(per_em) / n),
            "per_example": {"bleu": per_bleu, "rouge_l": per_rouge, "exact_match": per_em}}


# --------------------------------------------------------------------------- significance


def paired_bootstrap(a, b, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Paired bootstrap test of mean(b) - mean(a) over the same examples.

    Resamples example indices with replacement; the two-sided p-value is the fraction of
    resampled mean differences, centred on the observed one, at least as far from 0 as
    the observed difference (Berg-Kirkpatrick et al., 2012). Effect size: Cohen's d_z
    (mean paired difference / its standard deviation), and a 95% percentile interval.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError("paired_bootstrap needs two 1-D arrays of equal length >= 2")
    d = b - a
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // len(d))
    for s in range(0, n_resamples, chunk):
        e = min(n_resamples, s + chunk)
        idx = rng.integers(0, len(d), size=(e - s, len(d)))
        means[s:e] = d[idx].mean(axis=1)
    if np.allclose(d, d[0]) and delta == 0:
        p = 1.0
    else:
        p = float((np.sum(np.abs(means - delta) >= abs(delta)) + 1) / (n_resamples + 1))
    sd = float(d.std(ddof=1))
    return {"test": "paired bootstrap", "n": len(d), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "delta": delta, "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "p_value": min(1.0, p), "effect_size": (delta / sd) if sd > 0 else (0.0 if delta == 0 else math.inf),
            "effect_size_name": "Cohen's d_z", "resamples": n_resamples}


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test on paired correctness (exact binomial; chi-square with continuity
    correction when there are more than 25 discordant pairs). Effect size: odds ratio
    b01/b10 of the discordant pairs and Cohen's g = max(b01, b10)/(b01 + b10) - 0.5."""
    from scipy import stats

    ca = np.asarray(correct_a, dtype=bool)
    cb = np.asarray(correct_b, dtype=bool)
    if ca.shape != cb.shape:
        raise ValueError("mcnemar needs two arrays of equal length")
    only_b = int(np.sum(~ca & cb))  # b right, a wrong
    only_a = int(np.sum(ca & ~cb))
    n = only_a + only_b
    if n == 0:
        p, stat, kind = 1.0, 0.0, "exact"
    elif n <= 25:
        p = float(stats.binomtest(min(only_a, only_b), n, 0.5).pvalue)
        stat, kind = float(min(only_a, only_b)), "exact"
    else:
        stat = (abs(only_a - only_b) - 1) ** 2 / n
        p, kind = float(stats.chi2.sf(stat, 1)), "chi2-cc"
    odds = (only_b / only_a) if only_a else (math.inf if only_b else 1.0)
    return {"test": f"McNemar ({kind})", "n": int(len(ca)), "a_only_correct": only_a, "b_only_correct": only_b,
            "accuracy_a": float(ca.mean()), "accuracy_b": float(cb.mean()),
            "delta": float(cb.mean() - ca.mean()), "statistic": stat, "p_value": min(1.0, p),
            "effect_size": odds, "effect_size_name": "odds ratio (b-only / a-only)",
            "cohens_g": (max(only_a, only_b) / n - 0.5) if n else 0.0}
