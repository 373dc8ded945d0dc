"""iNaturalist 2018, ResNet-50. Paper: α=0.05, λ=0.5, lr 0.1 cosine."""
SPACE = {
    "alpha": ("loguniform", 0.005, 0.5),
    "lam": ("loguniform", 0.05, 2.0),
    "class_weight_power": ("uniform", 0.0, 1.0),
}
DEFAULTS = {"config": "inat18/lade", "epochs": 200, "num_samples": 16, "grace_period": 30}
