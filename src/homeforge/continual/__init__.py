"""Keep a served model learning without forgetting: feedback capture, replay + EWC fine-tuning, A/B.

- ``ewc``: diagonal Fisher information and the elastic weight-consolidation penalty;
- ``replay``: a batch source that mixes new data with an experience-replay sample of the old;
- ``learn``: `homeforge learn`, champion + new data -> candidate with forgetting and gain figures;
- ``feedback``: the encrypted, PII-scrubbed, rotating request/feedback log of `homeforge serve`.
"""
