"""Hyperparameter search with Ray Tune: the search driver (``search``), what runs in each trial and the
ASHA scheduler that survives a resumed search (``trials``), and the search spaces per dataset family (``spaces``)."""
