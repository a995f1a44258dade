"""register.py: two image files in common formats -> test.py's outputs on the fixed grid, and an ITK transform that
SimpleITK's resampler applies to the same result; bad inputs fail in one line and leave nothing written."""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import register
from data_loader.dataset import PairDataset
from data_loader.demo import make_demo_dataset
from data_loader.images import read_image
from model.similarity import SimilarityMetric
from model.variational import QF
from model.voxelmorph import VxmDense
from trainer import outputs
from trainer.checkpoint import (VXM_CHECKPOINT_KIND, load_voxelmorph, save_checkpoint, save_run_checkpoint,
                                vxm_state)
from trainer.pretrained import resolve_checkpoint
from trainer.registration import (PairFiles, PairTester, check_inputs, default_dims, reference_config,
                                  registration_config)
from tests.image_files import AFFINE, converted, nifti

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
FAST = ["--iterations", "4", "--samples", "2", "--set", "trainer.save_figures=false", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory) -> dict[str, Path]:
    """A demo atlas and a shifted subject at 16^3 on AFFINE: fixed as .mha, moving as .nrrd, both also NIfTI."""
    folder = tmp_path_factory.mktemp("pair")
    make_demo_dataset(folder / "demo", no_subjects=2, size=SIZE, seed=3)
    files = {}
    for role, subject, suffix in (("fixed", "sub-01", ".mha"), ("moving", "sub-02", ".nrrd")):
        for kind in ("im", "mask", "seg"):
            array = np.asanyarray(nib.load(folder / "demo" / subject / f"{kind}.nii.gz").dataobj)
            if role == "moving":  # content 2 voxels further along axis 1, so that registration has to move it
                array = np.concatenate([np.zeros_like(array[:, :2]), array[:, :-2]], axis=1)
            nii = nifti(folder / f"{role}_{kind}.nii.gz", array.astype(np.float32 if kind == "im" else np.int16))
            files[f"{role}_{kind}_nii"] = nii
            files[f"{role}_{kind}"] = converted(nii, suffix)
    return files


@pytest.fixture(scope="module")
def registered(demo_pair, tmp_path_factory) -> Path:
    """register.py run once on the .mha / .nrrd pair with both segmentations."""
    out = tmp_path_factory.mktemp("run") / "out"
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]), "-o", str(out),
                   "--fixed-mask", str(demo_pair["fixed_mask"]), "--fixed-seg", str(demo_pair["fixed_seg"]),
                   "--moving-seg", str(demo_pair["moving_seg"]), "--metric", "SSD", *FAST, "--iterations", "12",
                   "--set", "optimizer_q_v.args.lr=0.5", "--set", "reg_loss.args.w_reg=0.2"])  # moves voxels
    return out


def test_round_trip_writes_test_py_outputs_on_the_fixed_grid(registered, demo_pair):
    for name in (outputs.WARPED_IM, outputs.WARPED_SEG, outputs.DISPLACEMENT, outputs.ITK_DISPLACEMENT,
                 outputs.DISPLACEMENT_STD, outputs.DET_JACOBIAN, "metrics.csv", "summary.json", "config.json",
                 f"{outputs.SAMPLES_FOLDER}/{outputs.sample_name('warped_seg', 1)}"):
        assert (registered / name).is_file(), name
    for name in (outputs.WARPED_IM, outputs.WARPED_SEG, outputs.DISPLACEMENT):
        image = nib.load(registered / name)
        assert image.shape[:3] == (SIZE,) * 3
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)
    assert not list(registered.parent.glob(".*partial*"))


def test_itk_transform_reproduces_the_warped_outputs(registered, demo_pair, tmp_path):
    """SimpleITK's resampler with displacement_itk.nii.gz on the moving .nrrd gives the project's own warped images."""
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(registered / outputs.ITK_DISPLACEMENT), sitk.sitkVectorFloat64))
    fixed = sitk.ReadImage(str(demo_pair["fixed_im"]))
    moving = sitk.ReadImage(str(demo_pair["moving_im"]), sitk.sitkFloat32)
    low, high = sitk.GetArrayFromImage(moving).min(), sitk.GetArrayFromImage(moving).max()
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = nib.load(registered / outputs.WARPED_IM).get_fdata()
    theirs = (sitk.GetArrayFromImage(warped).transpose(2, 1, 0) - low) / (high - low)  # the loader's rescaling
    assert np.abs(ours).max() > 0.5
    np.testing.assert_allclose(theirs[1:-1, 1:-1, 1:-1], ours[1:-1, 1:-1, 1:-1], atol=1e-4)

    seg = sitk.ReadImage(str(demo_pair["moving_seg"]))
    warped_seg = sitk.Resample(seg, fixed, transform, sitk.sitkNearestNeighbor, 0)
    ours_seg = np.asanyarray(nib.load(registered / outputs.WARPED_SEG).dataobj)
    assert np.mean(sitk.GetArrayFromImage(warped_seg).transpose(2, 1, 0) != ours_seg) < 0.005
    assert np.mean(ours_seg != np.asanyarray(nib.load(demo_pair["moving_seg_nii"]).dataobj)) > 0.01  # it moved
    assert np.abs(nib.load(registered / outputs.DISPLACEMENT).get_fdata()).max() > 2.0  # mm, over a voxel

    out = tmp_path / "warped_seg.nrrd"  # the apply command does the same
    register.main(["apply", "--transform", str(registered / outputs.ITK_DISPLACEMENT), "--image",
                   str(demo_pair["moving_seg"]), "--reference", str(demo_pair["fixed_im"]), "-o", str(out),
                   "--labels"])
    applied, affine = read_image(out, "seg")
    np.testing.assert_array_equal(applied, sitk.GetArrayFromImage(warped_seg).transpose(2, 1, 0))
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)


def test_moving_image_on_another_grid_is_resampled_in_world_space(demo_pair, tmp_path):
    """A moving image stored one voxel shifted (same world content) loads exactly as the aligned one."""
    shifted_affine = AFFINE.copy()
    shifted_affine[:3, 3] += AFFINE[:3, :3] @ np.array([0.0, 1.0, 0.0])  # the grid starts one voxel later on axis 1
    for kind in ("im", "seg"):
        array = np.asanyarray(nib.load(demo_pair[f"moving_{kind}_nii"]).dataobj)
        nifti(tmp_path / f"{kind}.nii.gz", np.ascontiguousarray(array[:, 1:]), shifted_affine)
    aligned = check_inputs(PairFiles(demo_pair["fixed_im"], demo_pair["moving_im"],
                                     moving_seg=demo_pair["moving_seg"]))
    moved = check_inputs(PairFiles(demo_pair["fixed_im"], tmp_path / "im.nii.gz", moving_seg=tmp_path / "seg.nii.gz"))
    assert aligned[1].file_grid is None and moved[1].file_grid is not None
    loads = [PairDataset.from_subjects(subjects, [("fixed", "moving")], [SIZE] * 3).load_subject("moving")
             for subjects in (aligned, moved)]
    np.testing.assert_array_equal(loads[1]["seg"][0, :, :-1], loads[0]["seg"][0, :, :-1])
    # the moving image's min-max rescaling sees one slice less; the content is the same where it exists
    assert torch.corrcoef(torch.stack([loads[0]["im"][0, :, :-1].flatten(),
                                       loads[1]["im"][0, :, :-1].flatten()]))[0, 1] > 0.9999


def test_default_dims_and_config():
    assert default_dims((40, 48, 40), 128) == [48, 48, 48]
    assert default_dims((256, 256, 170), 128) == [128, 128, 128]
    config = registration_config(reference_config("LCC", "SVF"), (256, 256, 170), ROOT)
    assert config.data_loader.args.dims == [128, 128, 128] and config.transformation_module.type == "SVF_3D"
    assert (config.reg_loss.args.w_reg, config.optimizer_q_v.args.lr, config.trainer.no_iters_q_v) == (2.8, 0.02, 1344)
    # --model takes that model's reference setting (SVFFD LCC: w_reg 2.0, lr 0.01, 1024 iterations), e.g. from the
    # config of a checkpoint trained with SVF
    config = registration_config(reference_config("LCC", "SVF"), (256, 256, 170), ROOT, model="SVFFD", samples=3)
    assert config.transformation_module.type == "SVFFD_3D" and config.transformation_module.args.cps == [2, 2, 2]
    assert (config.reg_loss.args.w_reg, config.optimizer_q_v.args.lr, config.trainer.no_iters_q_v) == (2.0, 0.01, 1024)
    assert (config.data_loss.type, config.trainer.no_samples_test, config.model.args.learnable) == ("LCC", 3, False)
    assert registration_config(reference_config("LCC", "SVF"), (9,) * 3, ROOT, iterations=7).trainer.no_iters_q_v == 7
    assert registration_config(reference_config("SSD", "SVF"), (30, 30, 30), ROOT, dims=[24]).data_loader.args.dims \
        == [24, 24, 24]


def _bad(tmp_path: Path, demo_pair, **files) -> str:
    """register.py's error message for the demo pair with some files replaced; nothing may be written."""
    arguments = {"fixed": demo_pair["fixed_im"], "moving": demo_pair["moving_im"], **files}
    argv = [item for key, value in arguments.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        register.main([*argv, "-o", str(out), *FAST])
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "inputs"]
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, inputs, demo_pair):
    missing = inputs / "missing.nrrd"
    assert str(missing) in _bad(tmp_path, demo_pair, moving=missing)

    garbage = inputs / "garbage.mha"
    garbage.write_bytes(b"not an image at all")
    assert "cannot read image file" in _bad(tmp_path, demo_pair, moving=garbage)

    four_d = nifti(inputs / "four_d.nii.gz", np.zeros((SIZE, SIZE, SIZE, 2), dtype=np.float32))
    assert "expected a 3D image" in _bad(tmp_path, demo_pair, moving=converted(four_d, ".nrrd"))

    far = AFFINE.copy()
    far[:3, 3] += 200.0
    far_away = nifti(inputs / "far.nii.gz", np.asanyarray(nib.load(demo_pair["moving_im_nii"]).dataobj), far)
    assert "barely overlap" in _bad(tmp_path, demo_pair, moving=far_away)

    small_mask = nifti(inputs / "mask.nii.gz", np.ones((SIZE, SIZE, SIZE - 1), dtype=np.uint8))
    message = _bad(tmp_path, demo_pair, fixed_mask=small_mask)
    assert "does not match its image" in message and str(small_mask) in message

    moved_seg = nifti(inputs / "seg.nii.gz", np.asanyarray(nib.load(demo_pair["moving_seg_nii"]).dataobj), far)
    assert "does not match its image" in _bad(tmp_path, demo_pair, moving_seg=moved_seg)


def test_failure_during_registration_leaves_nothing(tmp_path, demo_pair, monkeypatch):
    def broken(self):
        (self.folder / "half-written.nii.gz").write_bytes(b"")
        raise ValueError("stopped on purpose")

    monkeypatch.setattr(PairTester, "test", broken)
    with pytest.raises(ValueError, match="stopped on purpose"):
        register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]),
                       "-o", str(tmp_path / "out"), *FAST])
    assert list(tmp_path.iterdir()) == []


def test_output_folder_must_be_new_or_empty(tmp_path, demo_pair):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]),
                       "-o", str(tmp_path / "out"), *FAST])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def learnt_ssd_checkpoint(path: Path) -> Path:
    """A checkpoint of train.py's layout: a Dirac-initialised learnable SSD metric with a training config."""
    config = registration_config(reference_config("SSD", "SVF"), (SIZE,) * 3, ROOT).to_dict()
    config["model"]["args"]["learnable"] = True
    config["reg_loss"]["args"]["w_reg"] = 0.7  # the setting the metric was "trained" in
    similarity = SimilarityMetric("SSD", learnable=True)
    optimizer = torch.optim.Adam(similarity.parameters())
    save_checkpoint(path, epoch=1, step=1, similarity=similarity, q_f=QF([SIZE] * 3, 0.1, 0.1),
                    optimizer_theta=optimizer, optimizer_q_f=optimizer, config=config)
    return path


def test_learnt_metric_checkpoint_registers_in_its_training_setting(tmp_path, demo_pair):
    checkpoint = learnt_ssd_checkpoint(tmp_path / "ssd.pt")
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]),
                   "-o", str(tmp_path / "out"), "-r", str(checkpoint), *FAST, "--iterations", "2"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"]["args"]["learnable"] and config["data_loss"]["type"] == "SSD"
    assert config["reg_loss"]["args"]["w_reg"] == 0.7 and config["trainer"]["no_iters_q_v"] == 2
    assert (tmp_path / "out" / outputs.ITK_DISPLACEMENT).is_file()


def test_checkpoint_of_another_metric_is_refused(tmp_path, demo_pair):
    checkpoint = learnt_ssd_checkpoint(tmp_path / "ssd.pt")
    with pytest.raises(ValueError, match="learnt SSD metric, not LCC"):
        register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]),
                       "-o", str(tmp_path / "out"), "-r", str(checkpoint), "--metric", "LCC", *FAST])
    assert not (tmp_path / "out").exists()


def test_command_line_error_is_one_line(tmp_path, demo_pair):
    result = subprocess.run([sys.executable, str(ROOT / "register.py"), "--fixed", str(demo_pair["fixed_im"]),
                             "--moving", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert lines[0].endswith(f"not found: {tmp_path / 'nope.nii.gz'}")
    assert not (tmp_path / "out").exists()


def test_importing_the_math_loads_neither_matplotlib_nor_tensorboard():
    code = ("import importlib, pkgutil, sys\n"
            "import model, utils, data_loader, trainer\n"
            "for package in (model, utils, data_loader, trainer):\n"
            "    for module in pkgutil.iter_modules(package.__path__):\n"
            "        importlib.import_module(f'{package.__name__}.{module.name}')\n"
            "import register, test, train\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'tensorboard'}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_pretrained_metric_without_run_config_gets_the_reference_setting():
    args = argparse.Namespace(metric=None, model="SVFFD", checkpoint="pretrained:LCC_learnt")
    checkpoint = {"similarity": {"type": "LCC", "learnable": True}, "config": None,
                  "similarity_config": {"kind": "LCC", "learnable": True, "s": 2, "no_features": [4, 8]}}
    config = register.base_config(args, checkpoint)
    assert config["transformation_module"]["type"] == "SVFFD_3D" and config["reg_loss"]["args"]["w_reg"] == 2.0
    assert config["model"]["args"] == {**config["model"]["args"], "learnable": True, "s": 2, "no_features": [4, 8]}


def test_apply_refuses_what_is_not_a_displacement_field(tmp_path, demo_pair):
    def message(transform: Path) -> str:
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            register.main(["apply", "--transform", str(transform), "--image", str(demo_pair["moving_im"]),
                           "--reference", str(demo_pair["fixed_im"]), "-o", str(tmp_path / "out.nii.gz")])
        assert not (tmp_path / "out.nii.gz").exists()
        return str(error.value)

    assert message(tmp_path / "none.nii.gz") == f"transform file not found: {tmp_path / 'none.nii.gz'}"
    assert "expected a 3D displacement field with 3 components" in message(demo_pair["fixed_im"])


def test_pretrained_metric_by_name(tmp_path, demo_pair):
    """pretrained:demo_LCC (shipped in the repository) registers with its learnt LCC metric."""
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]),
                   "-o", str(tmp_path / "out"), "-r", "pretrained:demo_LCC", *FAST, "--iterations", "2"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["data_loss"]["type"] == "LCC" and config["model"]["args"]["learnable"]
    assert "metric of the checkpoint" in (tmp_path / "out" / "register.log").read_text()


def vxm_network(path: Path, size: int = SIZE) -> Path:
    """A tiny VoxelMorph network for ``size``^3 saved as the authors saved theirs ({'config', 'model_state'}). Its
    velocity is the constant 2 voxels along axis 1 (flow layer: no weights, bias 2), the shift of the demo pair."""
    network = VxmDense.from_config({"inshape": [size] * 3, "nb_unet_features": [[4, 8], [8, 8, 4]], "int_steps": 3,
                                    "int_downsize": 2})
    with torch.no_grad():
        network.flow.weight.zero_()
        network.flow.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    torch.save({"config": {**network.config(), "bidir": False, "use_probs": False},
                "model_state": network.state_dict()}, path)
    return path


def test_voxelmorph_network_registers_the_pair(tmp_path, demo_pair, capsys):
    network = vxm_network(tmp_path / "checkpoint_VXM.pt")
    out = tmp_path / "out"
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]), "-o", str(out),
                   "--fixed-seg", str(demo_pair["fixed_seg"]), "--moving-seg", str(demo_pair["moving_seg"]),
                   "-r", str(network), "--device", "cpu", "--set", "trainer.save_figures=false"])
    for name in (outputs.WARPED_IM, outputs.WARPED_SEG, outputs.DISPLACEMENT, outputs.ITK_DISPLACEMENT,
                 outputs.DET_JACOBIAN, "metrics.csv", "summary.json", "config.json", "register.log"):
        assert (out / name).is_file(), name
    assert not (out / outputs.DISPLACEMENT_STD).exists() and not (out / outputs.SAMPLES_FOLDER).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["type"] == "VxmDense" and config["data_loader"]["args"]["dims"] == [SIZE] * 3
    displacement = nib.load(out / outputs.DISPLACEMENT).get_fdata()  # mm along RAS; AFFINE's axis 1 is 2 mm
    assert np.abs(displacement).max() > 2.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_dice_after"] > summary["mean_dice_before"] + 0.05  # the network undoes the shift
    printed = capsys.readouterr().out
    assert f"VoxelMorph network {network}" in printed
    assert f"before {summary['mean_dice_before']:.3f}, after {summary['mean_dice_after']:.3f}" in printed
    assert "VoxelMorph network from" in (out / "register.log").read_text()

    model, _ = load_voxelmorph(network)  # the same network as our training checkpoint: the same displacement
    ours = tmp_path / "checkpoint_epoch1.pt"
    save_run_checkpoint(ours, VXM_CHECKPOINT_KIND, epoch=1, step=1, config={},
                        state=vxm_state(model, torch.optim.Adam(model.parameters())))
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]), "-o",
                   str(tmp_path / "ours"), "-r", str(ours), "--device", "cpu", "--set", "trainer.save_figures=false"])
    np.testing.assert_array_equal(nib.load(tmp_path / "ours" / outputs.DISPLACEMENT).get_fdata(), displacement)


def test_voxelmorph_network_refuses_other_dims_and_q_v_options(tmp_path, demo_pair):
    network = vxm_network(tmp_path / "net.pt")
    out = tmp_path / "out"
    base = ["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]), "-o", str(out),
            "-r", str(network), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"takes inputs of shape \[16, 16, 16\], not --dims \[24, 24, 24\]"):
        register.main([*base, "--dims", "24"])
    with pytest.raises(ValueError, match="--iterations, --samples apply to q_v registration only"):
        register.main([*base, "--iterations", "4", "--samples", "2"])
    with pytest.raises(ValueError, match=r"takes inputs of shape \[16, 16, 16\].*dims \[24, 24, 24\]"):
        register.main([*base, "--set", "data_loader.args.dims=[24, 24, 24]"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]
    register.main([*base, "--dims", "16", "--set", "trainer.save_outputs=false", "--set",
                   "trainer.save_figures=false"])  # the network's own shape is accepted
    assert (out / "summary.json").is_file()


@pytest.mark.skipif(not (ROOT.parent / "shared" / "pretrained" / "authors" / "VXM_SSD_learnt.tar.gz").is_file(),
                    reason="the authors' VoxelMorph tarballs (../shared/pretrained/authors) are absent")
def test_authors_voxelmorph_tarball_registers_at_its_input_shape(tmp_path, demo_pair):
    """The authors' network takes 128^3: the 16^3 pair is resampled to it, the outputs are on the fixed grid."""
    out = tmp_path / "out"
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]), "-o", str(out),
                   "-r", str(ROOT.parent / "shared" / "pretrained" / "authors" / "VXM_SSD_learnt.tar.gz"),
                   "--device", "cpu", "--set", "trainer.save_figures=false"])
    assert json.loads((out / "config.json").read_text())["data_loader"]["args"]["dims"] == [128] * 3
    field = sitk.ReadImage(str(out / outputs.ITK_DISPLACEMENT))
    assert field.GetSize() == (SIZE,) * 3 and field.GetNumberOfComponentsPerPixel() == 3


def test_pretrained_voxelmorph_by_name(tmp_path, demo_pair, monkeypatch):
    """pretrained:NAME of a VoxelMorph entry of the manifest (here the tiny network, tarred as the authors' files)."""
    pt = vxm_network(tmp_path / "checkpoint_VXM_tiny.pt")
    tarball = tmp_path / "VXM_tiny.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(pt, arcname=pt.name)
    data = tarball.read_bytes()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format_version": 1, "models": [
        {"name": "VXM_tiny", "kind": "voxelmorph", "description": "test", "url": tarball.as_uri(), "size": len(data),
         "checksum": "sha256:" + hashlib.sha256(data).hexdigest(), "config": None}]}))
    monkeypatch.setattr(register, "resolve_checkpoint",
                        functools.partial(resolve_checkpoint, manifest=manifest, cache=tmp_path / "cache"))
    out = tmp_path / "out"
    register.main(["--fixed", str(demo_pair["fixed_im"]), "--moving", str(demo_pair["moving_im"]), "-o", str(out),
                   "-r", "pretrained:VXM_tiny", "--device", "cpu", "--set", "trainer.save_figures=false"])
    assert json.loads((out / "config.json").read_text())["model"]["type"] == "VxmDense"
    assert (out / outputs.ITK_DISPLACEMENT).is_file()
