"""Checkpoint folders: what is accepted, and the errors for what is not."""
import json
import shutil

import pytest
import torch

from weights.checkpoint import SUPPORTED_FAMILIES, Checkpoint, CheckpointError


def test_loads_task_head_checkpoints_by_base_names(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["llama"])  # saved as LlamaForCausalLM: tensors under "model."
    assert ckpt.family == "llama" and ckpt.num_layers == 4
    assert ckpt.tensor("embed_tokens.weight").shape[1] == ckpt.hidden_size


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        Checkpoint(tmp_path / "empty")


def test_pickled_weights_are_refused(tiny_checkpoints, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoints["bert"], folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        Checkpoint(folder)


def test_no_weights(tiny_checkpoints, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoints["bert"], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint(folder)


def test_unsupported_family_lists_the_supported_ones(tiny_checkpoints, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_checkpoints["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not supported") as err:
        Checkpoint(folder)
    assert all(f in str(err.value) for f in SUPPORTED_FAMILIES)


def test_missing_tensor_is_named(tiny_checkpoints):
    with pytest.raises(CheckpointError, match="'layers.9.self_attn.q_proj.weight' is missing"):
        Checkpoint(tiny_checkpoints["llama"]).tensor("layers.9.self_attn.q_proj.weight")


def _with_layers(source, folder, layers: int):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_weights_with_more_layers_than_the_config_names_are_refused(tiny_checkpoints, tmp_path, family):
    folder = _with_layers(tiny_checkpoints[family], tmp_path / family, 2)  # the weights hold 4
    with pytest.raises(CheckpointError, match=r"weights hold 4 layers .*config.json names 2 \(num_hidden_layers\)"):
        Checkpoint(folder)


def test_a_split_past_the_config_layers_is_a_checkpoint_error_naming_both(tiny_checkpoints):
    from engine.backbone.split import LowerEncoder, UpperEncoder
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    for build in (LowerEncoder, UpperEncoder.from_checkpoint):
        with pytest.raises(CheckpointError, match=r"must be in \[0, 4\] for the 4 layers config.json names.*got 6"):
            build(ckpt, 6)


def test_a_config_naming_more_layers_than_the_weights_hold_names_the_missing_layer(tiny_checkpoints, tmp_path):
    from engine.backbone.split import UpperEncoder
    ckpt = Checkpoint(_with_layers(tiny_checkpoints["bert"], tmp_path / "six", 6))  # fewer weights: a lower-only copy
    with pytest.raises(CheckpointError, match="layer 4 is missing"):
        UpperEncoder.from_checkpoint(ckpt, 2)
