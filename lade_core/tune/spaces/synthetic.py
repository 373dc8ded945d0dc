"""The embedded synthetic dataset (10 classes, 32x32): the quick local search."""
SPACE = {
    "alpha": ("loguniform", 0.01, 1.0),
    "lam": ("loguniform", 0.001, 1.0),
    "class_weight_power": ("uniform", 0.0, 1.0),
    "lr": ("loguniform", 0.01, 0.3),
}
DEFAULTS = {"config": "synthetic/lade", "epochs": 10, "num_samples": 8, "grace_period": 2}
