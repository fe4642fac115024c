"""The model registry: versions with lineage, aliases, gated promotion, rollback (``store``, ``gates``)."""
