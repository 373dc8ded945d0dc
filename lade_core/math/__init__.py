"""The paper's math: priors and the shifted protocol, the losses and their registry, the classifier heads, the
post-hoc rules and their registry, metrics, evaluation under any target prior, label-shift estimation, test-time
aggregation of a multi-expert model's experts, batch mixing, shared checks and DDP gathering.

These modules import only torch, numpy and the standard library (``tests/test_structure.py`` holds them to it in a
fresh interpreter). The rest of lade_core (data, models, training, search, tracking, serving) builds on them.
"""
