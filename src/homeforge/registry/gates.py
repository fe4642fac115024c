"""The promotion gate: is a candidate measurably better than the champion on the same held-out data?

Both versions must have been registered with an evaluation of the same dataset content, split
and evaluation window; the per-example results are then paired: per-document loss (paired
bootstrap) for language models, per-record correctness (McNemar) for classifiers.
"""

from __future__ import annotations

from homeforge.errors import HomeforgeError


def check(cand: dict | None, champ: dict | None, gates, cand_no: int, champ_no: int | None) -> dict:
    """``{"passed", "detail", ...}``; raise HomeforgeError when there is nothing to compare."""
    from homeforge.evaluate import metrics

    if champ_no is None:
        return {"passed": True, "detail": "no current version: the first one is promoted without a comparison"}
    if cand is None or champ is None:
        missing = cand_no if cand is None else champ_no
        raise HomeforgeError(f"version {missing} was registered without an evaluation, so the gate cannot compare "
                             "the two versions; nothing was changed",
                             fix="register it with --eval EVAL_DIR (the report `homeforge eval` wrote for it)")
    if cand["data"] != champ["data"] or cand["config"] != champ["config"]:
        raise HomeforgeError(f"versions {cand_no} and {champ_no} were evaluated on different data or settings "
                             f"(dataset {cand['data'][:12]} vs {champ['data'][:12]}, {cand['config']} vs "
                             f"{champ['config']}): no shared evaluation data, no paired test; nothing was changed",
                             fix="evaluate both models on the same dataset artifact with the same eval config, "
                                 "and register them with those reports")
    if gates.metric == "perplexity":
        a, b = champ.get("doc_loss"), cand.get("doc_loss")
        if not a or not b or len(a) != len(b) or len(a) < 2:
            raise HomeforgeError("the evaluations have no paired per-document losses", fix="evaluate a language "
                                 "model on a text dataset (at least 2 documents)")
        t = metrics.paired_bootstrap(a, b)
        gain = champ["ppl"] / cand["ppl"] - 1  # > 0: the candidate's perplexity is lower
        ok = gain >= gates.min_improvement and t["delta"] < 0 and t["p_value"] < gates.p_value
        change = cand["ppl"] / champ["ppl"] - 1
        detail = (f"perplexity {cand['ppl']:.3f} vs {champ['ppl']:.3f} ({change:+.2%}, an improvement of {gain:.2%}), "
                  f"paired bootstrap p={t['p_value']:.4g} over {len(a)} documents; needs an improvement >= "
                  f"{gates.min_improvement:.2%} with p < {gates.p_value}")
    elif gates.metric == "accuracy":
        a, b = champ.get("correct"), cand.get("correct")
        if not a or not b or len(a) != len(b):
            raise HomeforgeError("the evaluations have no paired per-record results", fix="evaluate a classifier on "
                                 "a classification dataset")
        t = metrics.mcnemar(a, b)
        gain = cand["accuracy"] - champ["accuracy"]
        ok = gain >= gates.min_improvement and gain > 0 and t["p_value"] < gates.p_value
        detail = (f"accuracy {cand['accuracy']:.4f} vs {champ['accuracy']:.4f} ({gain:+.4f}), McNemar "
                  f"p={t['p_value']:.4g}; needs +{gates.min_improvement} with p < {gates.p_value}")
    else:
        raise HomeforgeError(f"unknown gate metric {gates.metric!r}", fix="perplexity or accuracy")
    return {"passed": bool(ok), "detail": detail, "p_value": t["p_value"], "gain": gain}
