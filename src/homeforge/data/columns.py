"""Streaming statistics of tabular inputs (CSV, Parquet) for the data report."""

from __future__ import annotations

import numpy as np


class ColumnStats:
    """Streaming Pearson correlations between the numeric columns of one table."""

    MAX_COLS = 64

    def __init__(self, columns: list[str]):
        self.columns = list(columns)[: self.MAX_COLS]
        self.numeric = np.ones(len(self.columns), dtype=bool)
        k = len(self.columns)
        self.n = 0
        self.s = np.zeros(k)
        self.xx = np.zeros((k, k))

    def update_rows(self, values: np.ndarray, ok: np.ndarray) -> None:
        """values: (rows, k) float; ok: (k,) columns numeric in every one of these rows."""
        self.numeric &= ok
        v = np.where(np.isfinite(values), values, 0.0)
        self.n += len(v)
        self.s += v.sum(0)
        self.xx += v.T @ v

    def add_dict_rows(self, rows: list[dict]) -> None:
        if not rows or not self.columns:
            return
        vals = np.zeros((len(rows), len(self.columns)))
        ok = np.ones(len(self.columns), dtype=bool)
        for j, c in enumerate(self.columns):
            if not self.numeric[j]:
                ok[j] = False
                continue
            for i, r in enumerate(rows):
                try:
                    vals[i, j] = float(r.get(c))
                except (TypeError, ValueError):
                    ok[j] = False
                    break
        self.update_rows(vals, ok)

    def correlated(self, threshold: float) -> list[dict]:
        if self.n < 3:
            return []
        mean = self.s / self.n
        cov = self.xx / self.n - np.outer(mean, mean)
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        out = []
        idx = [j for j in range(len(self.columns)) if self.numeric[j] and sd[j] > 1e-12]
        for a_i, a in enumerate(idx):
            for b in idx[a_i + 1:]:
                r = float(cov[a, b] / (sd[a] * sd[b]))
                if abs(r) >= threshold:
                    out.append({"a": self.columns[a], "b": self.columns[b], "r": round(r, 4)})
        return out
