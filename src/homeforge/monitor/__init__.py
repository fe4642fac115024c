"""`homeforge monitor`: recent traffic (the feedback log) against the training data.

- ``drift``: the statistics (PSI, Jensen-Shannon divergence, MMD, quantiles, refusals);
- ``report``: reading traffic and training data, the figures, the report, Prometheus gauges and alerts.
"""
