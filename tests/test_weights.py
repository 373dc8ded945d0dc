"""``--weights-path``: a backbone checkpoint loads without its classifier (another class count); a file for another
network, a partial one, or no state dict at all is one error naming what differs, never a silent partial load."""
import pytest
import torch

from lade_core.models.backbones import build_model


def test_a_backbone_checkpoint_with_another_class_count_loads_without_its_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet32", 100)
    torch.save(source.state_dict(), tmp_path / "c100.pt")
    model = build_model("resnet32", 10, str(tmp_path / "c100.pt"))
    own, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("fc."))
    assert own["fc.weight"].shape == (10, 64)
    torch.save({"model": source.state_dict()}, tmp_path / "wrapped.pt")  # a training checkpoint's layout
    assert torch.equal(build_model("resnet32", 10, str(tmp_path / "wrapped.pt")).state_dict()["stem.0.weight"],
                       theirs["stem.0.weight"])


def test_a_file_for_another_network_or_a_partial_one_is_refused_by_name(tmp_path):
    full = build_model("resnet32", 10).state_dict()
    partial = {k: v for k, v in full.items() if not k.startswith("features.14.")}  # its last block
    torch.save(partial, tmp_path / "partial.pt")
    missing = r"does not match model resnet32: backbone keys missing from the file \[.features.14"
    with pytest.raises(ValueError, match=missing):
        build_model("resnet32", 10, str(tmp_path / "partial.pt"))
    torch.save(build_model("resnet50", 10).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ValueError, match="does not match model resnet32: keys not in the model"):
        build_model("resnet32", 10, str(tmp_path / "r50.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        build_model("resnet32", 10, str(tmp_path / "tensor.pt"))
