"""Checkpoints hold tensors and plain values only, so loading one from shared storage never runs code."""
import pickle
import random

import numpy as np
import pytest
import torch

from lade_core.training import load_checkpoint, restore_rng_state, rng_state


def test_checkpoint_loads_with_weights_only_and_restores_every_rng(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 4, "rng": [rng_state()],
             "history": [{"epoch": 0, "val/top1": 0.5}], "config": {"lr": 0.1, "milestones": [1, 2], "x": None}}
    torch.save(state, tmp_path / "checkpoint.pt")
    expected = (torch.rand(4), np.random.standard_normal(4), [random.random() for _ in range(4)])
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded["config"] == state["config"] and loaded["history"] == state["history"]
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
    torch.save({"model": {}, "payload": _RunsCode(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()
