"""Evaluation: perplexity, baselines (and, later, classification and generation metrics)."""
