"""CIFAR-100-LT, ResNet-32. Paper: α=0.1, λ=0.01 at imbalance 100, lr 0.2 (batch 256); ranges bracket them."""
SPACE = {
    "alpha": ("loguniform", 0.01, 1.0),
    "lam": ("loguniform", 0.001, 1.0),
    "class_weight_power": ("uniform", 0.0, 1.0),
    "lr": ("loguniform", 0.05, 0.4),
}
DEFAULTS = {"config": "cifar100_lt/lade", "epochs": 200, "num_samples": 32, "grace_period": 20}
