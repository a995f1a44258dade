"""Every README code block marked runnable (an HTML comment ``<!-- runnable -->`` on the line before the fence)
runs as written, in order, in one folder holding a demo pair, from outside the checkout (the package found as after
``pip install -e .``)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_loader.demo import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.DOTALL)


def runnable_blocks() -> list[str]:
    return RUNNABLE.findall((ROOT / "README.md").read_text())


def test_the_readme_has_runnable_blocks():
    assert len(runnable_blocks()) >= 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """fixed.nii.gz, moving.nii.gz and their segmentations and mask: two demo subjects at 16^3."""
    folder = tmp_path_factory.mktemp("readme")
    make_demo_dataset(folder / "demo", no_subjects=2, size=16, seed=5)
    for role, subject in (("fixed", "sub-01"), ("moving", "sub-02")):
        for kind, name in (("im", f"{role}.nii.gz"), ("seg", f"{role}_seg.nii.gz"), ("mask", f"{role}_mask.nii.gz")):
            image = nib.load(folder / "demo" / subject / f"{kind}.nii.gz")
            array = np.asanyarray(image.dataobj)
            nib.save(nib.Nifti1Image(array * 100.0 if kind == "im" else array, image.affine), folder / name)
    return folder


def test_runnable_blocks_run_as_written(folder):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}  # what `pip install -e .` provides
    for number, block in enumerate(runnable_blocks(), start=1):
        result = subprocess.run([sys.executable, "-c", block], cwd=folder, env=environment, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"README runnable block {number} failed:\n{block}\n{result.stderr[-3000:]}"
