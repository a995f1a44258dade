"""VxmDense: the authors' checkpoints load, and the outputs match those of the voxelmorph 0.1 package."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model.voxelmorph import (VoxelMorphError, VxmDense, load_authors_voxelmorph, read_authors_checkpoint)

SHARED = Path(__file__).resolve().parents[2] / "shared"
AUTHORS = SHARED / "pretrained" / "authors"
AUTHORS_MODELS = ["VXM_LCC_baseline", "VXM_LCC_learnt", "VXM_SSD_baseline", "VXM_SSD_learnt"]
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "vxm_golden.npz"
# METHOD.md: the authors' VxmDense has 301,411 parameters; their config:
AUTHORS_CONFIG = {"flow_log_sigma_bias": -5, "use_probs": False, "bidir": False, "int_downsize": 2, "int_steps": 12,
                  "unet_feat_mult": 1, "nb_unet_levels": None, "inshape": (128, 128, 128),
                  "nb_unet_features": [(16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16)]}

needs_authors = pytest.mark.skipif(not AUTHORS.is_dir(), reason=f"{AUTHORS} is absent (the authors' tarballs)")


def test_parameter_count_and_keys_of_the_authors_layout():
    model = VxmDense.from_config(AUTHORS_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 301_411
    keys = set(model.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("unet_model.")} == {"downarm", "uparm", "extras"}
    assert {"flow.weight", "flow.bias", "unet_model.extras.0.main.weight"} <= keys
    assert model.state_dict()["unet_model.extras.0.main.weight"].shape == (32, 34, 3, 3, 3)


def test_config_round_trip_is_json_and_rebuilds_the_network():
    model = VxmDense.from_config({**AUTHORS_CONFIG, "inshape": (16, 32, 48)})
    config = model.config()
    assert config == {"inshape": [16, 32, 48], "nb_unet_features": [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]],
                      "int_steps": 12, "int_downsize": 2}
    rebuilt = VxmDense(**config)
    rebuilt.load_weights(model.state_dict(), "round trip")
    x, y = torch.rand(2, 1, 1, 16, 32, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, y).displacement, model(x, y).displacement)


@pytest.mark.parametrize("change, message", [
    ({"bidir": True}, "bidir"), ({"use_probs": True}, "use_probs"), ({"nb_unet_levels": 4}, "nb_unet_levels"),
    ({"shape": 3}, "unknown"), ({"inshape": (40, 32, 32)}, "multiple of 16"), ({"int_downsize": 0}, "int_downsize"),
])
def test_unsupported_configs_fail_clearly(change, message):
    with pytest.raises(VoxelMorphError, match=message):
        VxmDense.from_config({**AUTHORS_CONFIG, **change}, "my.pt")


def test_zero_flow_is_the_identity_and_the_input_shape_is_checked():
    model = VxmDense([16, 16, 32], int_steps=7)
    torch.nn.init.zeros_(model.flow.weight)
    moving, fixed = torch.rand(2, 1, 1, 16, 16, 32)
    with torch.no_grad():
        out = model(moving, fixed)
    assert out.velocity.shape == (1, 3, 8, 8, 16) and out.displacement.shape == (1, 3, 16, 16, 32)
    assert torch.count_nonzero(out.displacement) == 0
    torch.testing.assert_close(out.warped, moving, rtol=0, atol=1e-5)
    with pytest.raises(VoxelMorphError, match=r"\[16, 16, 32\]"):
        model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))


def test_constant_velocity_is_a_translation_with_zeros_outside():
    """A constant velocity v integrates to the translation by v; what comes from outside the image is 0."""
    model = VxmDense([32, 32, 32], int_steps=5, int_downsize=2)
    velocity = torch.tensor([1.0, -0.5, 0.25]).view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16)
    displacement = model.integrate(velocity)
    # at half size a voxel is two full-size voxels: 2 v, away from the edges where zeros flow in
    inner = displacement[:, :, 12:20, 12:20, 12:20]
    torch.testing.assert_close(inner, 2 * velocity[:, :, :8, :8, :8], rtol=0, atol=1e-5)
    assert displacement[0, 0, -1].max() < 1.5  # not 2: at the far edge of axis 0 zeros flow in (border padding: 2)
    ones = model.transform(torch.ones(1, 1, 16, 16, 16), torch.full((1, 3, 16, 16, 16), 3.0))
    assert torch.all(ones[..., :13, :13, :13] == 1) and torch.all(ones[..., -2:] == 0)


@needs_authors
@pytest.mark.parametrize("name", AUTHORS_MODELS)
def test_the_authors_tarballs_and_the_pt_inside_load(name, tmp_path):
    tarball = AUTHORS / f"{name}.tar.gz"
    model = load_authors_voxelmorph(tarball)
    assert sum(p.numel() for p in model.parameters()) == 301_411
    assert model.inshape == (128, 128, 128) and model.int_steps == 12 and not model.training
    with tarfile.open(tarball) as tar:
        tar.extract(f"checkpoint_{name}.pt", tmp_path, filter="data")
    checkpoint = read_authors_checkpoint(tmp_path / f"checkpoint_{name}.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model_state"][key]), key


@needs_authors
def test_golden_outputs_of_voxelmorph_0_1():
    """Same weights, same inputs: the package's outputs (tests/fixtures/make_vxm_golden.py) to float32 round-off."""
    golden = np.load(GOLDEN)
    tarball = AUTHORS / f"{golden['model']}.tar.gz"
    checkpoint = read_authors_checkpoint(tarball)
    model = VxmDense.from_config({**checkpoint["config"], "inshape": golden["moving"].shape}, str(tarball))
    model.load_weights(checkpoint["model_state"], str(tarball))
    moving = torch.from_numpy(golden["moving"].astype(np.float32))[None, None]
    fixed = torch.from_numpy(golden["fixed"].astype(np.float32))[None, None]
    with torch.no_grad():
        out = model.eval()(moving, fixed)
        warped_ones = model.transform(torch.ones_like(moving), out.displacement)
    assert np.abs(golden["displacement"]).max() > 0.5  # a flow large enough to show a wrong axis or padding
    np.testing.assert_allclose(out.velocity[0].numpy(), golden["velocity"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.displacement[0].numpy(), golden["displacement"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.warped[0, 0].numpy(), golden["warped"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(warped_ones[0, 0].numpy(), golden["warped_ones"], rtol=0, atol=1e-5)


def test_a_learnsim_checkpoint_is_not_a_voxelmorph_one(tmp_path):
    path = tmp_path / "checkpoint_epoch3.pt"
    torch.save({"kind": "learnsim/similarity-metric", "model": {}}, path)
    with pytest.raises(VoxelMorphError, match=f"{path}.*learnsim checkpoint"):
        load_authors_voxelmorph(path)
    with pytest.raises(VoxelMorphError, match="does not exist"):
        load_authors_voxelmorph(tmp_path / "missing.tar.gz")
