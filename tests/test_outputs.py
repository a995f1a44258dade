"""Output files on the input grid: a known world translation comes back as that translation, in mm, world axes."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from data_loader.demo import make_demo_dataset
from data_loader.geometry import (displacement_to_input_world, displacement_to_world, working_affine,
                                  working_to_input)
from tests.demo_config import demo_config
from model.variational import QV
from trainer import outputs
from trainer.run_folder import create_run_folder
from trainer.tester import Tester as RegistrationTester  # not collected by pytest
from utils.distributed import setup
from utils.io import load_nifti, save_nifti
from utils.metrics import dice


# array axis 0 -> world +y (1.2 mm), axis 1 -> world +z (2.0 mm), axis 2 -> world -x (1.5 mm)
INPUT_AFFINE = np.array([[0.0, 0.0, -1.5, 12.0],
                         [1.2, 0.0, 0.0, -11.0],
                         [0.0, 2.0, 0.0, -14.0],
                         [0.0, 0.0, 0.0, 1.0]])
INPUT_SHAPE = (20, 16, 14)
DIMS = (12, 12, 12)
SHIFT_VOXELS = (2, 0, -1)  # content of the moving image moves by this many input voxels per array axis
TRANSLATION_MM = INPUT_AFFINE[:3, :3] @ np.array(SHIFT_VOXELS, dtype=float)  # (1.5, 2.4, 0) mm, world axes


def shifted(array: np.ndarray, shift) -> np.ndarray:
    """``array`` with its content moved by ``shift`` voxels per axis, zero where nothing moved in."""
    result = np.zeros_like(array)
    source = tuple(slice(max(-k, 0), n - max(k, 0)) for k, n in zip(shift, array.shape))
    target = tuple(slice(max(k, 0), n - max(-k, 0)) for k, n in zip(shift, array.shape))
    result[target] = array[source]
    return result


@pytest.fixture(scope="module")
def translated_pair(tmp_path_factory):
    """A fixed subject (demo atlas, cropped to a non-cubic shape, permuted anisotropic affine) and a moving one that
    is the fixed image moved by TRANSLATION_MM in world coordinates."""
    demo = make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", no_subjects=2, size=20)
    root = tmp_path_factory.mktemp("translated") / "data"
    crop = tuple(slice((20 - n) // 2, (20 - n) // 2 + n) for n in INPUT_SHAPE)
    for kind, name in (("image", "im"), ("mask", "mask"), ("seg", "seg")):
        array, _ = load_nifti(demo / "sub-01" / f"{name}.nii.gz", kind)
        array = array[crop]
        save_nifti(root / "fixed" / f"{name}.nii.gz", array, INPUT_AFFINE)
        save_nifti(root / "moving" / f"{name}.nii.gz", shifted(array, SHIFT_VOXELS), INPUT_AFFINE)
    (root / "pairs.csv").write_text("fixed,moving\n")
    (root / "labels.json").write_text((demo / "labels.json").read_text())
    return root


def test_displacement_to_world_is_the_affine_matrix():
    rng = np.random.default_rng(0)
    displacement = rng.standard_normal((3, 4, 5, 6))
    expected = np.einsum("kj,jxyz->kxyz", INPUT_AFFINE[:3, :3], displacement)
    np.testing.assert_allclose(displacement_to_world(displacement, INPUT_AFFINE), expected)
    as_tensor = displacement_to_world(torch.from_numpy(displacement), INPUT_AFFINE)
    np.testing.assert_allclose(as_tensor.numpy(), expected)


def test_constant_working_displacement_is_the_world_translation_on_the_input_grid():
    affine = working_affine(INPUT_AFFINE, INPUT_SHAPE, DIMS)
    working = np.linalg.solve(affine[:3, :3], TRANSLATION_MM)  # working voxels
    field = np.broadcast_to(working.reshape(3, 1, 1, 1), (3, *DIMS)).copy()
    world = displacement_to_input_world(field, INPUT_AFFINE, INPUT_SHAPE, DIMS)
    assert world.shape == (3, *INPUT_SHAPE)
    np.testing.assert_allclose(world, np.broadcast_to(TRANSLATION_MM.reshape(3, 1, 1, 1), world.shape), atol=1e-9)
    # the working grid is coarser: one working voxel is (side - 1) / (dims - 1) input voxels
    np.testing.assert_allclose(np.diag(working_to_input(INPUT_SHAPE, DIMS))[:3], [19 / 11] * 3)


def test_known_world_translation_survives_load_register_save(translated_pair, tmp_path):
    """Inject the velocity of the known translation as q_v's mean; the files must hold it in mm, world axes."""
    config = demo_config(translated_pair, tmp_path, dims=DIMS, batch_size=1, no_samples_test=2)
    context = setup("cpu")
    folder = create_run_folder(config.trainer.save_dir, config.name, "test", context)
    tester = RegistrationTester(config, folder, context)
    batch = next(iter(tester.loader))
    np.testing.assert_allclose(batch["input_affine"][0].numpy(), INPUT_AFFINE)
    velocity = np.linalg.solve(batch["affine"][0].numpy()[:3, :3], TRANSLATION_MM)  # constant v -> translation
    q_v = QV.initial(1, DIMS, 1e-4, 0.0)
    with torch.no_grad():
        q_v.mu.copy_(torch.tensor(velocity, dtype=torch.float32).view(1, 3, 1, 1, 1).expand_as(q_v.mu))
    rows, uncertainty = tester.evaluate(batch, q_v)

    folder = folder / outputs.PAIRS_FOLDER / "fixed_moving"
    image = nib.load(folder / outputs.DISPLACEMENT)
    assert image.shape == (*INPUT_SHAPE, 1, 3)
    assert image.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(image.affine, INPUT_AFFINE, atol=1e-6)
    field = np.asarray(image.dataobj)[:, :, :, 0, :]
    np.testing.assert_allclose(field, np.broadcast_to(TRANSLATION_MM, field.shape), atol=1e-4)

    # phi(x) = x + t maps the fixed image onto the moving one: the warped moving image is the fixed image again
    fixed, _ = load_nifti(translated_pair / "fixed" / "im.nii.gz", "image")
    moving, _ = load_nifti(translated_pair / "moving" / "im.nii.gz", "image")
    warped, affine = load_nifti(folder / outputs.WARPED_IM, "image")
    np.testing.assert_allclose(affine, INPUT_AFFINE, atol=1e-6)
    fixed, moving = fixed / fixed.max(), moving / moving.max()
    inner = (slice(3, -3),) * 3
    error_after = np.abs(warped - fixed)[inner].mean()
    error_before = np.abs(moving - fixed)[inner].mean()
    assert error_after < 0.5 * error_before  # not 0: the 12^3 working grid is coarser than the input grid
    fixed_seg, _ = load_nifti(translated_pair / "fixed" / "seg.nii.gz", "seg")
    moving_seg, _ = load_nifti(translated_pair / "moving" / "seg.nii.gz", "seg")
    warped_seg, _ = load_nifti(folder / outputs.WARPED_SEG, "seg")
    labels = list(tester.labels.values())
    assert np.nanmean(dice(fixed_seg, warped_seg, labels)) > np.nanmean(dice(fixed_seg, moving_seg, labels)) + 0.15

    det_j, _ = load_nifti(folder / outputs.DET_JACOBIAN, "image")
    np.testing.assert_allclose(det_j, 1.0, atol=1e-4)
    std, _ = load_nifti(folder / outputs.DISPLACEMENT_STD, "image")
    assert std.shape == INPUT_SHAPE and 0.0 <= std.min() and std.max() < 0.05  # sigma 1e-4, u = 0
    mean_rows = [r for r in rows if r["sample"] == "mean"]
    assert all(r["folding_voxels_mask"] == 0 and r["folding_voxels_reference"] == 0 for r in mean_rows)
    assert set(uncertainty) == {"fixed_moving"}


def test_registration_recovers_the_world_translation(translated_pair, tmp_path):
    """Real q_v inference: the mean saved displacement inside the mask points along the translation."""
    config = demo_config(translated_pair, tmp_path, dims=DIMS, batch_size=1, no_samples_test=2, no_iters_q_v=48,
                         save_figures=False)
    context = setup("cpu")
    folder = create_run_folder(config.trainer.save_dir, config.name, "test", context)
    tester = RegistrationTester(config, folder, context)
    batch = next(iter(tester.loader))
    tester.evaluate(batch, tester.register(batch, 0))
    field = np.asarray(nib.load(tester.folder / outputs.PAIRS_FOLDER / "fixed_moving" / outputs.DISPLACEMENT)
                       .dataobj)[:, :, :, 0, :]
    mask, _ = load_nifti(translated_pair / "fixed" / "mask.nii.gz", "mask")
    recovered = field[mask].mean(0)
    cosine = recovered @ TRANSLATION_MM / (np.linalg.norm(recovered) * np.linalg.norm(TRANSLATION_MM))
    assert cosine > 0.9, recovered
    assert 0.6 < np.linalg.norm(recovered) / np.linalg.norm(TRANSLATION_MM) < 1.5, recovered
