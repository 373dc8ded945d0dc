"""ImageNet-LT, ResNeXt-50. Paper: α=0.05, λ=0.5, lr 0.05 cosine. Learning rate left fixed: costly to search."""
SPACE = {
    "alpha": ("loguniform", 0.005, 0.5),
    "lam": ("loguniform", 0.05, 2.0),
    "class_weight_power": ("uniform", 0.0, 1.0),
}
DEFAULTS = {"config": "imagenet_lt/lade", "epochs": 180, "num_samples": 16, "grace_period": 30}
