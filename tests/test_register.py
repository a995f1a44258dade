"""register.py and trainer.registration.register: two images in common formats -> the moving image through one
composed transformation (affine step, then the non-rigid one) on the fixed grid, written as ANTs writes its
transforms, so that SimpleITK (and ANTs) applying the written files reproduce the outputs; the inverse; bad inputs
fail in one line and leave nothing written."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import register
from data_loader.demo import make_demo_dataset
from data_loader.images import read_image
from model.similarity import SimilarityMetric
from model.variational import QF
from model.voxelmorph import VxmDense
from trainer import registration
from trainer.checkpoint import (VXM_CHECKPOINT_KIND, load_voxelmorph, save_checkpoint, save_run_checkpoint,
                                vxm_state)
from trainer.pair_inputs import PairInputs
from trainer.pretrained import resolve_checkpoint
from trainer.registration import Registration, register as register_pair
from trainer.registration_config import base_config, default_dims, reference_config, registration_config
from utils.affine import affine_register
from tests.image_files import AFFINE, converted, nifti

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
FAST = ["--iterations", "4", "--samples", "2", "--device", "cpu"]
MOVES = ["--set", "optimizer_q_v.args.lr=0.5", "--set", "reg_loss.args.w_reg=0.2"]  # enough to move voxels


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
                if kind == "im":
                    array = 100.0 + 250.0 * array  # other intensity units than the fixed image's
            nii = nifti(folder / f"{role}_{kind}.nii.gz", array.astype(np.float32 if kind == "im" else np.int16))
            files[f"{role}_{kind}_nii"] = nii
            files[f"{role}_{kind}"] = converted(nii, suffix)
    return files


def pair_args(demo_pair, *keys: str) -> list[str]:
    keys = keys or ("fixed_im", "moving_im")
    names = {"fixed_im": "--fixed", "moving_im": "--moving", "fixed_mask": "--fixed-mask", "fixed_seg": "--fixed-seg",
             "moving_seg": "--moving-seg"}
    return [item for key in keys for item in (names[key], str(demo_pair[key]))]


ALL = ("fixed_im", "moving_im", "fixed_mask", "fixed_seg", "moving_seg")


@pytest.fixture(scope="module")
def registered(demo_pair, tmp_path_factory) -> Path:
    """register.py run once on the .mha / .nrrd pair with both segmentations (affine step and pyramid: defaults)."""
    out = tmp_path_factory.mktemp("run") / "out"
    register.main([*pair_args(demo_pair, *ALL), "-o", str(out), "--metric", "SSD", *FAST, "--iterations", "12",
                   *MOVES])
    return out


def written_transform(folder: Path, prefix: str = "") -> sitk.CompositeTransform:
    """The transform of the written files, read by SimpleITK alone, in antsApplyTransforms' order (warp, affine):
    SimpleITK applies the last transform of a composite first."""
    affine = sitk.ReadTransform(str(folder / f"{prefix}0GenericAffine.mat"))
    warp = sitk.DisplacementFieldTransform(sitk.ReadImage(str(folder / f"{prefix}1Warp.nii.gz"),
                                                          sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, warp])


def test_outputs_are_on_the_fixed_grid(registered, demo_pair):
    for name in register.OUTPUTS:
        assert (registered / name).is_file(), name
    for name in (registration.WARPED_IM, registration.WARPED_SEG, registration.DET_JACOBIAN):
        image = nib.load(registered / name)
        assert image.shape[:3] == (SIZE,) * 3
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)
    assert not list(registered.parent.glob(".*partial*"))
    summary = json.loads((registered / registration.SUMMARY).read_text())
    assert summary["affine"] == "mattes" and [level["shape"] for level in summary["q_v_levels"]] == [[9] * 3, [16] * 3]


def test_simpleitk_reproduces_the_outputs_from_the_written_transforms(registered, demo_pair, tmp_path):
    """One interpolation: SimpleITK applying 0GenericAffine.mat and 1Warp.nii.gz to the ORIGINAL moving .nrrd gives
    warped_im (moving intensity units, to 1e-4) and warped_seg (identical)."""
    transform = written_transform(registered)
    fixed = sitk.ReadImage(str(demo_pair["fixed_im"]))
    warped = sitk.Resample(sitk.ReadImage(str(demo_pair["moving_im"]), sitk.sitkFloat32), fixed, transform,
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = nib.load(registered / registration.WARPED_IM).get_fdata()
    assert ours.max() > 300.0  # the moving image's units (100 + 250 x), not rescaled
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped).transpose(2, 1, 0), ours, atol=1e-4)
    warped_seg = sitk.Resample(sitk.ReadImage(str(demo_pair["moving_seg"])), fixed, transform,
                               sitk.sitkNearestNeighbor, 0)
    ours_seg = np.asanyarray(nib.load(registered / registration.WARPED_SEG).dataobj)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped_seg).transpose(2, 1, 0), ours_seg)
    assert np.mean(ours_seg != np.asanyarray(nib.load(demo_pair["moving_seg_nii"]).dataobj)) > 0.01  # it moved
    affine = sitk.ReadTransform(str(registered / registration.AFFINE)).Downcast()
    assert np.abs(np.asarray(affine.GetTranslation())).max() > 0.5  # the affine step did something (mm)

    # the whole transformation as one field, and the apply command on it
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(registered / registration.DISPLACEMENT_ITK),
                                                           sitk.sitkVectorFloat64))
    one = sitk.Resample(sitk.ReadImage(str(demo_pair["moving_seg"])), fixed, field, sitk.sitkNearestNeighbor, 0)
    assert np.mean(sitk.GetArrayFromImage(one).transpose(2, 1, 0) != ours_seg) < 0.002
    out = tmp_path / "warped_seg.nrrd"
    register.main(["apply", "--transform", str(registered / registration.DISPLACEMENT_ITK), "--image",
                   str(demo_pair["moving_seg"]), "--reference", str(demo_pair["fixed_im"]), "-o", str(out),
                   "--labels"])
    applied, affine_out = read_image(out, "seg")
    np.testing.assert_array_equal(applied, sitk.GetArrayFromImage(one).transpose(2, 1, 0))
    np.testing.assert_allclose(affine_out, AFFINE, atol=1e-5)


def test_ants_reproduces_the_outputs_from_the_written_transforms(registered, demo_pair):
    ants = pytest.importorskip("ants", reason="ANTsPy is benchmark-only (benchmarks/requirements-ants.txt)")
    fixed = ants.image_read(str(demo_pair["fixed_im_nii"]))
    transforms = [str(registered / registration.WARP), str(registered / registration.AFFINE)]
    warped = ants.apply_transforms(fixed, ants.image_read(str(demo_pair["moving_im_nii"])), transforms)
    np.testing.assert_allclose(warped.numpy(), nib.load(registered / registration.WARPED_IM).get_fdata(), atol=1e-3)
    warped_seg = ants.apply_transforms(fixed, ants.image_read(str(demo_pair["moving_seg_nii"])), transforms,
                                       interpolator="nearestNeighbor")
    np.testing.assert_array_equal(np.rint(warped_seg.numpy()),
                                  np.asanyarray(nib.load(registered / registration.WARPED_SEG).dataobj))


def test_printed_dice_is_that_of_the_written_segmentation(registered, demo_pair):
    """metrics.csv's Dice of the posterior mean equals SimpleITK's overlap of the written warped_seg with the fixed
    segmentation, label by label."""
    rows = [row for row in __import__("csv").DictReader(open(registered / registration.METRICS_CSV))
            if row["sample"] == "mean"]
    measures = sitk.LabelOverlapMeasuresImageFilter()
    fixed = sitk.ReadImage(str(demo_pair["fixed_seg"]), sitk.sitkInt32)
    written = sitk.ReadImage(str(registered / registration.WARPED_SEG), sitk.sitkInt32)
    written.CopyInformation(fixed)
    measures.Execute(fixed, written)
    assert len(rows) > 3
    for row in rows:
        np.testing.assert_allclose(float(row["dice"]), measures.GetDiceCoefficient(int(row["label"])), atol=1e-9)


def test_inverse_warp_composes_to_the_identity(registered, demo_pair):
    """exp(-v) after exp(v): the residual at the fixed mask's voxel centres is well under a voxel, and a small
    fraction of how far the warp itself moves them."""
    def field(name):
        return sitk.DisplacementFieldTransform(sitk.ReadImage(str(registered / name), sitk.sitkVectorFloat64))

    warp, inverse = field(registration.WARP), field(registration.INVERSE_WARP)
    mask = sitk.ReadImage(str(demo_pair["fixed_mask"]))
    points = [mask.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]])
              for index in np.argwhere(sitk.GetArrayFromImage(mask) > 0)]
    voxel = np.linalg.inv(np.asarray(mask.GetDirection()).reshape(3, 3) * np.asarray(mask.GetSpacing()))
    moved = np.array([np.asarray(warp.TransformPoint(p)) - p for p in points]) @ voxel.T
    residual = np.array([np.asarray(inverse.TransformPoint(warp.TransformPoint(p))) - p for p in points]) @ voxel.T
    largest = np.linalg.norm(moved, axis=1).max()
    assert largest > 0.3  # the affine step took most of the 2-voxel shift; the warp still moves
    assert np.linalg.norm(residual, axis=1).max() < min(0.2, 0.25 * largest)
    assert np.linalg.norm(residual, axis=1).mean() < 0.05


@pytest.fixture(scope="module")
def shifted(demo_pair, tmp_path_factory) -> dict:
    """The fixed image itself stored on a grid moved by a known world translation (mm): its content lies at
    p + shift, so the affine step must find T(p) = p + shift."""
    folder = tmp_path_factory.mktemp("shift")
    shift = np.array([6.0, -4.0, 8.0])  # RAS mm
    moved = AFFINE.copy()
    moved[:3, 3] += shift
    array = np.asanyarray(nib.load(demo_pair["fixed_im_nii"]).dataobj)
    return {"path": nifti(folder / "moving.nii.gz", array, moved), "shift_lps": shift * [-1.0, -1.0, 1.0]}


def test_affine_step_recovers_a_known_translation(demo_pair, shifted):
    result = register_pair(demo_pair["fixed_im_nii"], shifted["path"], fixed_mask=demo_pair["fixed_mask"],
                           iterations=1, samples=2, device="cpu")
    centre = np.asarray(sitk.ReadImage(str(demo_pair["fixed_im"])).TransformContinuousIndexToPhysicalPoint(
        [SIZE / 2] * 3))
    moved = np.asarray(result.affine.TransformPoint(centre)) - centre
    np.testing.assert_allclose(moved, shifted["shift_lps"], atol=1.0)  # half the largest voxel (2 mm) of 16^3


def test_the_affine_step_is_repeatable(demo_pair):
    """Its random sampling is seeded: the same inputs give the same transform."""
    fixed, moving = (sitk.ReadImage(str(demo_pair[key]), sitk.sitkFloat32) for key in ("fixed_im", "moving_im"))
    first, second = (affine_register(fixed, moving) for _ in range(2))
    # equal up to the order of the threads' sums, which moved a translation by 1.6e-9 mm on a loaded machine
    # (another sample of the voxels moves them by ~1e-3)
    np.testing.assert_allclose(first.GetParameters(), second.GetParameters(), rtol=0, atol=1e-6)


def test_initial_transform_from_a_file_is_the_affine_step(demo_pair, shifted, tmp_path):
    """--affine none with --initial-transform: the given ITK/ANTs affine is used as it is (and composed)."""
    translation = sitk.TranslationTransform(3, shifted["shift_lps"].tolist())
    for name in ("given.mat", "given.tfm"):
        sitk.WriteTransform(translation, str(tmp_path / name))
        result = register_pair(demo_pair["fixed_im_nii"], shifted["path"], affine="none",
                               initial_transform=tmp_path / name, iterations=1, samples=2, device="cpu")
        np.testing.assert_allclose(result.affine.GetTranslation(), shifted["shift_lps"], atol=1e-9)
        np.testing.assert_allclose(np.asarray(result.affine.GetMatrix()), np.eye(3).ravel(), atol=1e-12)
    with pytest.raises(ValueError, match="barely overlap"):  # without either, the 50 % overlap check stands
        register_pair(demo_pair["fixed_im_nii"], shifted["path"], affine="none", iterations=1, device="cpu")


def test_output_prefix_in_the_ants_manner(demo_pair, tmp_path):
    prefix = str(tmp_path / "results" / "pair_")
    register.main([*pair_args(demo_pair), "--output-prefix", prefix, *FAST])
    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert names == sorted(f"pair_{name}" for name in register.OUTPUTS if name != registration.WARPED_SEG)
    with pytest.raises(ValueError, match="pair_warped_im.nii.gz exists"):
        register.main([*pair_args(demo_pair), "--output-prefix", prefix, *FAST])


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "register.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


@pytest.mark.parametrize("signum, code, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_signal_ends_the_run_with_one_line_and_nothing_written(demo_pair, tmp_path, signum, code, line):
    process = _run([*pair_args(demo_pair), "-o", str(tmp_path / "out"), "--iterations", "1000000",
                    "--schedule", "faithful", "--device", "cpu"])
    assert process.stdout.readline().startswith("registering")  # past start-up: in the registration
    time.sleep(1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code
    assert stderr.strip().splitlines() == [line]
    assert list(tmp_path.iterdir()) == []


def test_no_cursor_codes_when_stderr_is_not_a_terminal(demo_pair, tmp_path):
    process = _run([*pair_args(demo_pair), "-o", str(tmp_path / "out"), *FAST])
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "\r" not in stderr and "\x1b[" not in stderr and "\r" not in stdout
    assert "results in" in stdout


def test_moving_image_on_another_grid_is_resampled_in_world_space(demo_pair, tmp_path):
    """A moving image stored one voxel shifted (same world content) gives the same working images."""
    shifted_affine = AFFINE.copy()
    shifted_affine[:3, 3] += AFFINE[:3, :3] @ np.array([0.0, 1.0, 0.0])  # the grid starts one voxel later on axis 1
    array = np.asanyarray(nib.load(demo_pair["moving_im_nii"]).dataobj)
    moved = nifti(tmp_path / "im.nii.gz", np.ascontiguousarray(array[:, 1:]), shifted_affine)
    identity = sitk.AffineTransform(3)
    aligned = PairInputs.load(demo_pair["fixed_im"], demo_pair["moving_im"]).resampled_moving(identity)
    resampled = PairInputs.load(demo_pair["fixed_im"], moved).resampled_moving(identity)
    np.testing.assert_allclose(resampled[:, 1:], aligned[:, 1:], atol=1e-4)


def test_default_dims_and_config():
    assert default_dims((40, 48, 40), 128) == [48, 48, 48]
    assert default_dims((256, 256, 170), 128) == [128, 128, 128]
    config = registration_config(reference_config("LCC", "SVF"), (256, 256, 170), ROOT)
    assert config.data_loader.args.dims == [128, 128, 128] and config.transformation_module.type == "SVF_3D"
    assert (config.reg_loss.args.w_reg, config.optimizer_q_v.args.lr, config.trainer.no_iters_q_v) == (2.8, 0.02, 1344)
    assert config.trainer.q_v_pyramid is None  # the faithful schedule unless asked
    config = registration_config(reference_config("LCC", "SVF"), (256, 256, 170), ROOT, model="SVFFD", samples=3)
    assert config.transformation_module.type == "SVFFD_3D" and config.transformation_module.args.cps == [2, 2, 2]
    assert (config.reg_loss.args.w_reg, config.optimizer_q_v.args.lr, config.trainer.no_iters_q_v) == (2.0, 0.01, 1024)
    assert (config.data_loss.type, config.trainer.no_samples_test, config.model.args.learnable) == ("LCC", 3, False)
    pyramid = registration_config(reference_config("LCC", "SVF"), (9,) * 3, ROOT, iterations=7, schedule="pyramid")
    assert pyramid.trainer.no_iters_q_v == 7 and pyramid.trainer.q_v_pyramid.levels == [4, 2, 1]
    assert registration_config(reference_config("SSD", "SVF"), (30, 30, 30), ROOT, dims=[24]).data_loader.args.dims \
        == [24, 24, 24]


def _bad(tmp_path: Path, demo_pair, **files) -> str:
    """register.py's error message for the demo pair with some files replaced; nothing may be written."""
    arguments = {"fixed": demo_pair["fixed_im"], "moving": demo_pair["moving_im"], **files}
    argv = [item for key, value in arguments.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        register.main([*argv, "-o", str(out), "--affine", "none", *FAST])
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

    bad_transform = inputs / "bad.tfm"
    bad_transform.write_text("not a transform")
    assert "cannot read transform file" in _bad(tmp_path, demo_pair, initial_transform=bad_transform)


def test_failure_while_writing_leaves_nothing(tmp_path, demo_pair, monkeypatch):
    original = Registration.save

    def broken(self, prefix):
        original(self, prefix)
        raise OSError(28, "No space left on device", "somewhere")

    monkeypatch.setattr(Registration, "save", broken)
    for output in (["-o", str(tmp_path / "out")], ["--output-prefix", str(tmp_path / "p_")]):
        with pytest.raises(OSError):
            register.main([*pair_args(demo_pair), *output, *FAST])
        assert list(tmp_path.iterdir()) == []


def test_output_folder_must_be_new_or_empty(tmp_path, demo_pair):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        register.main([*pair_args(demo_pair), "-o", str(tmp_path / "out"), *FAST])
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
    register.main([*pair_args(demo_pair), "-o", str(tmp_path / "out"), "-r", str(checkpoint), *FAST,
                   "--iterations", "2"])
    config = json.loads((tmp_path / "out" / registration.CONFIG).read_text())
    assert config["model"]["args"]["learnable"] and config["data_loss"]["type"] == "SSD"
    assert config["reg_loss"]["args"]["w_reg"] == 0.7 and config["trainer"]["no_iters_q_v"] == 2
    assert (tmp_path / "out" / registration.WARP).is_file()


def test_checkpoint_of_another_metric_is_refused(tmp_path, demo_pair):
    checkpoint = learnt_ssd_checkpoint(tmp_path / "ssd.pt")
    with pytest.raises(ValueError, match="learnt SSD metric, not LCC"):
        register.main([*pair_args(demo_pair), "-o", str(tmp_path / "out"), "-r", str(checkpoint), "--metric", "LCC",
                       *FAST])
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
    checkpoint = {"similarity": {"type": "LCC", "learnable": True}, "config": None,
                  "similarity_config": {"kind": "LCC", "learnable": True, "s": 2, "no_features": [4, 8]}}
    config = base_config(checkpoint, None, "SVFFD", "pretrained:LCC_learnt")
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
    register.main([*pair_args(demo_pair), "-o", str(tmp_path / "out"), "-r", "pretrained:demo_LCC", *FAST,
                   "--iterations", "2"])
    config = json.loads((tmp_path / "out" / registration.CONFIG).read_text())
    assert config["data_loss"]["type"] == "LCC" and config["model"]["args"]["learnable"]
    assert json.loads((tmp_path / "out" / registration.SUMMARY).read_text())["method"].startswith("learnt LCC")


def test_the_api_takes_arrays_and_simpleitk_images(demo_pair):
    """register() on (array, affine) and SimpleITK inputs gives what it gives on the files."""
    arrays = {key: (np.asanyarray(nib.load(demo_pair[f"{key}_nii"]).dataobj), AFFINE)
              for key in ("fixed_im", "moving_im", "fixed_seg", "moving_seg")}
    images = {key: sitk.ReadImage(str(demo_pair[key])) for key in ("fixed_im", "moving_im")}
    options = {"iterations": 2, "samples": 2, "device": "cpu", "affine": "none"}
    from_arrays = register_pair(arrays["fixed_im"], arrays["moving_im"], fixed_seg=arrays["fixed_seg"],
                                moving_seg=arrays["moving_seg"], **options)
    from_images = register_pair(images["fixed_im"], images["moving_im"], **options)
    from_files = register_pair(demo_pair["fixed_im"], demo_pair["moving_im"], **options)
    for result in (from_arrays, from_images):
        np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(from_files.warped),
                                   atol=1e-4)
    assert from_arrays.summary["mean_dice_after"] is not None and from_files.warped_seg is None
    assert isinstance(from_files.transform, sitk.CompositeTransform)
    assert from_files.displacement_std is not None and from_files.displacement_std.GetSize() == (SIZE,) * 3


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
    register.main([*pair_args(demo_pair, "fixed_im", "moving_im", "fixed_seg", "moving_seg"), "-o", str(out),
                   "--affine", "none", "-r", str(network), "--device", "cpu"])
    for name in register.OUTPUTS:
        assert (out / name).is_file() == (name != registration.DISPLACEMENT_STD), name  # a network has no posterior
    config = json.loads((out / registration.CONFIG).read_text())
    assert config["model"]["type"] == "VxmDense" and config["data_loader"]["args"]["dims"] == [SIZE] * 3
    warp = sitk.GetArrayFromImage(sitk.ReadImage(str(out / registration.WARP)))  # LPS mm; AFFINE's axis 1 is 2 mm
    assert np.abs(warp).max() > 2.0
    summary = json.loads((out / registration.SUMMARY).read_text())
    assert summary["mean_dice_after"] > summary["mean_dice_before"] + 0.05  # the network undoes the shift
    printed = capsys.readouterr().out
    assert f"VoxelMorph network {network}" in printed
    assert f"after {summary['mean_dice_after']:.3f}" in printed

    model, _ = load_voxelmorph(network)  # the same network as our training checkpoint: the same displacement
    ours = tmp_path / "checkpoint_epoch1.pt"
    save_run_checkpoint(ours, VXM_CHECKPOINT_KIND, epoch=1, step=1, config={},
                        state=vxm_state(model, torch.optim.Adam(model.parameters())))
    register.main([*pair_args(demo_pair), "-o", str(tmp_path / "ours"), "--affine", "none", "-r", str(ours),
                   "--device", "cpu"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ours" / registration.WARP))),
                                  warp)


def test_voxelmorph_network_refuses_other_dims_and_q_v_options(tmp_path, demo_pair):
    network = vxm_network(tmp_path / "net.pt")
    out = tmp_path / "out"
    base = [*pair_args(demo_pair), "-o", str(out), "-r", str(network), "--device", "cpu", "--affine", "none"]
    with pytest.raises(ValueError, match=r"takes inputs of shape \[16, 16, 16\], not --dims \[24, 24, 24\]"):
        register.main([*base, "--dims", "24"])
    with pytest.raises(ValueError, match="iterations, samples apply to q_v registration only"):
        register.main([*base, "--iterations", "4", "--samples", "2"])
    with pytest.raises(ValueError, match=r"takes inputs of shape \[16, 16, 16\].*dims \[24, 24, 24\]"):
        register.main([*base, "--set", "data_loader.args.dims=[24, 24, 24]"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]
    register.main([*base, "--dims", "16"])  # the network's own shape is accepted
    assert (out / registration.SUMMARY).is_file()


@pytest.mark.skipif(not (ROOT.parent / "shared" / "pretrained" / "authors" / "VXM_SSD_learnt.tar.gz").is_file(),
                    reason="the authors' VoxelMorph tarballs (../shared/pretrained/authors) are absent")
def test_authors_voxelmorph_tarball_registers_at_its_input_shape(tmp_path, demo_pair):
    """The authors' network takes 128^3: the 16^3 pair is resampled to it, the outputs are on the fixed grid."""
    out = tmp_path / "out"
    register.main([*pair_args(demo_pair), "-o", str(out), "--affine", "none",
                   "-r", str(ROOT.parent / "shared" / "pretrained" / "authors" / "VXM_SSD_learnt.tar.gz"),
                   "--device", "cpu"])
    assert json.loads((out / registration.CONFIG).read_text())["data_loader"]["args"]["dims"] == [128] * 3
    field = sitk.ReadImage(str(out / registration.WARP))
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
    monkeypatch.setattr(registration, "resolve_checkpoint",
                        functools.partial(resolve_checkpoint, manifest=manifest, cache=tmp_path / "cache"))
    out = tmp_path / "out"
    register.main([*pair_args(demo_pair), "-o", str(out), "--affine", "none", "-r", "pretrained:VXM_tiny",
                   "--device", "cpu"])
    assert json.loads((out / registration.CONFIG).read_text())["model"]["type"] == "VxmDense"
    assert (out / registration.DISPLACEMENT_ITK).is_file()


def test_a_non_finite_registration_is_not_a_result(tmp_path, demo_pair):
    """q_v going NaN (a far too large lr) fails with the pair, iteration and term named, and writes nothing."""
    with pytest.raises(ValueError, match=r"q_v inference: the .* of pair .*moving_im.* became NaN or infinite at "
                                         r"iteration \d+ \(is optimizer_q_v.args.lr 1e\+06 too large\?\)"):
        register.main([*pair_args(demo_pair), "-o", str(tmp_path / "out"), *FAST, "--affine", "none",
                       "--set", "optimizer_q_v.args.lr=1e6"])
    assert list(tmp_path.iterdir()) == []


def test_apply_refuses_a_non_finite_displacement_field(tmp_path, demo_pair):
    field = sitk.Image([SIZE] * 3, sitk.sitkVectorFloat32, 3)
    field.SetPixel([1, 2, 3], [0.0, float("nan"), 0.0])
    sitk.WriteImage(field, str(tmp_path / "nan_warp.mha"))
    with pytest.raises(ValueError, match="nan_warp.mha: the displacement field holds NaN or infinite values"):
        register.main(["apply", "--transform", str(tmp_path / "nan_warp.mha"), "--image",
                       str(demo_pair["moving_im"]), "--reference", str(demo_pair["fixed_im"]), "-o",
                       str(tmp_path / "out.nii.gz")])
    assert not (tmp_path / "out.nii.gz").exists()


def test_one_process_per_output(tmp_path, demo_pair):
    """A registration into an output that another process is registering into is refused before it starts."""
    from utils.io import LockedError, exclusive_lock

    argv = [*pair_args(demo_pair), "-o", str(tmp_path / "out"), *FAST]
    with exclusive_lock(register.output_lock(register.parse_args(argv)), "held"):
        with pytest.raises(LockedError, match=f"output {tmp_path / 'out'}/ is in use by another process "
                                              f"\\(PID {os.getpid()}"):
            register.main(argv)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_gzip_stream_is_refused(tmp_path, inputs, demo_pair):
    """A .nii.gz whose CRC does not match its data is named, not registered."""
    raw = bytearray(demo_pair["moving_im_nii"].read_bytes())
    raw[-6] ^= 0x10  # in the CRC-32 of the gzip trailer
    bad = inputs / "bad_crc.nii.gz"
    bad.write_bytes(bytes(raw))
    message = _bad(tmp_path, demo_pair, moving=bad)
    assert message.startswith(f"{bad}: corrupt gzip data") and "CRC" in message


def _limit_file_size() -> None:
    """In the child: files may not grow beyond 4 kB (writes fail with EFBIG, the path a full disk takes too)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))


def test_an_incomplete_write_fails_naming_the_output(tmp_path, demo_pair):
    """SimpleITK's NIfTI writer only prints a message when a write fails: the short file is caught, and the error
    names the output the user asked for; nothing is left behind."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "register.py", *pair_args(demo_pair), "-o", str(out), *FAST,
                             "--affine", "none"], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=_limit_file_size, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert line.startswith(f"error: the image file was written incompletely: {out}{os.sep}"), line
    assert list(tmp_path.iterdir()) == []


def test_output_folder_may_not_be_a_symbolic_link(tmp_path, demo_pair):
    """-o naming a symbolic link is refused before anything runs (it failed after the registration)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="is a symbolic link"):
        register.main([*pair_args(demo_pair), "-o", str(tmp_path / "link"), *FAST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"] and not any((tmp_path / "real").iterdir())


def test_a_singular_initial_transform_is_refused(tmp_path, inputs, demo_pair):
    """An initial transform without an inverse fails up front, naming the file (not numpy's 'Singular matrix')."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    sitk.WriteTransform(transform, str(inputs / "singular.mat"))
    message = _bad(tmp_path, demo_pair, initial_transform=inputs / "singular.mat")
    assert message.startswith(f"{inputs / 'singular.mat'}: the affine transform is singular or not finite")
