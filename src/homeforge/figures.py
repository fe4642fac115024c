"""Figures for PNG plots without pyplot: no global backend switched, no figure left registered."""

from __future__ import annotations


def figure(width: float, height: float, ncols: int = 1, dpi: int = 100):
    """(figure, axes): a standalone matplotlib Figure (``fig.savefig(path)`` writes it; nothing
    to close) and one axes, or a row of ``ncols`` axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig, (fig.subplots(1, ncols, squeeze=False)[0] if ncols > 1 else fig.subplots())
