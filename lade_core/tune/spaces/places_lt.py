"""Places-LT, ResNet-152 fine-tuned (classifier lr 0.05, backbone 0.001). Paper: α=0.005, λ=0.1."""
SPACE = {
    "alpha": ("loguniform", 0.0005, 0.05),
    "lam": ("loguniform", 0.01, 1.0),
    "class_weight_power": ("uniform", 0.0, 1.0),
    "lr": ("loguniform", 0.01, 0.1),
}
DEFAULTS = {"config": "places_lt/lade", "epochs": 30, "num_samples": 16, "grace_period": 10}
