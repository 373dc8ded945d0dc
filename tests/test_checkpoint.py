"""Checkpoints hold tensors and plain values only, so loading one from shared storage never runs code."""
import json
import pickle
import random

import numpy as np
import pytest
import torch

from lade_core.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_rng_state, rng_state, save_checkpoint


def test_checkpoint_loads_with_weights_only_and_restores_every_rng(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 4, "rng": [rng_state()]}
    config, history = {"lr": 0.1, "milestones": [1, 2], "x": None}, [{"epoch": 0, "val/top1": 0.5}]
    save_checkpoint(tmp_path, state, config, history)
    expected = (torch.rand(4), np.random.standard_normal(4), [random.random() for _ in range(4)])
    loaded = load_checkpoint(tmp_path)
    assert loaded["config"] == config and loaded["history"] == history and loaded["epoch"] == 4
    # The config and history sit beside the tensors as JSON, readable without torch.
    assert json.loads((tmp_path / "config.json").read_text()) == config
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(loaded["rng"][0])
    got = (torch.rand(4), np.random.standard_normal(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the file


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    save_checkpoint(tmp_path, {"model": {}}, {}, [])
    torch.save({"model": {}, "payload": _RunsCode(marker)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)
    assert not marker.exists()
