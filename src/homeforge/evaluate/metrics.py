"""Metric functions: classification, generation text overlap, and paired significance tests.

Classification metrics are computed from the confusion matrix in numpy (checked against
scikit-learn in the tests); BLEU is sacrebleu's (the reproducible reference); ROUGE-L is
the LCS F-measure with rouge-score's default tokenisation (checked against rouge-score).
"""

from __future__ import annotations

import math
import re
import string

import numpy as np

# --------------------------------------------------------------------------- classification


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def average_precision(y_true_binary, scores) -> float:
    """Area under the precision-recall curve as step-wise average precision (sklearn's definition)."""
    y = np.asarray(y_true_binary, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # one threshold per distinct score: take the last index of each tie block
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    prev_recall = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev_recall) * precision))


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
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = labels or [str(i) for i in range(n_classes)]
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    pred_pos = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_pos > 0, tp / pred_pos, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (pred_pos > 0)  # sklearn's macro average over labels seen in y_true or y_pred
    out = {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class": {labels[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                  "support": int(support[i])} for i in range(n_classes)},
        "confusion_matrix": cm.tolist(),
        "labels": labels,
        "confusion_entropy": confusion_entropy(cm),
    }
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        aps = [average_precision(y_true == i, scores[:, i]) for i in range(n_classes)]
        valid = [a for a in aps if not math.isnan(a)]
        out["auc_pr"] = float(np.mean(valid)) if valid else float("nan")
        for i, a in enumerate(aps):
            out["per_class"][labels[i]]["auc_pr"] = a
    return out


# --------------------------------------------------------------------------- generation


def _rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, non-alphanumerics to spaces, split."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (LCS based, beta = 1) of one pair."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = _lcs(r, p)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lowercase, drop punctuation, articles, extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu), mean ROUGE-L F, exact match; plus per-example scores."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    bleu = sacrebleu.corpus_bleu(predictions, [references])
    per_bleu = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references, strict=True)]
    per_rouge = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    per_em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    n = max(1, len(predictions))
    return {"n": len(predictions), "bleu": float(bleu.score), "rouge_l": float(sum(per_rouge) / n),
            "exact_match": float(sum(per_em) / n),
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
