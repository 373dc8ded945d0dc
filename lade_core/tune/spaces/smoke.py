"""A tiny space for tests and --smoke-test: LADE's α, λ, τ and the learning rate over wide ranges."""
SPACE = {
    "alpha": ("loguniform", 0.01, 1.0),
    "lam": ("loguniform", 0.001, 1.0),
    "class_weight_power": ("uniform", 0.0, 1.0),
    "lr": ("loguniform", 0.001, 0.5),
}
DEFAULTS = {"config": "synthetic/lade", "epochs": 2, "num_samples": 4, "grace_period": 1}
