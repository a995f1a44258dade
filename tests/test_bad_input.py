"""The catalogue of bad input: each case must fail with one clear line and leave everything as it was.

Every case runs train.py or test.py in-process through ``trainer.cli.run`` (as ``python train.py ...`` does) and
asserts: a non-zero exit; a one-line message naming the file, the key or the flag; no traceback; and no file
written, changed or removed anywhere (so no run folder is left behind and nothing escapes its folder). Resume
cases start from a copy of one finished tiny run. Faults after the start (a full disk) leave a run folder whose
status says 'failed' with the message.
"""
from __future__ import annotations

import errno
import gzip
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import test as test_entry
import train as train_entry
from tests.demo_config import tiny_config
from trainer.cli import run
from trainer.run_folder import read_status

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Workspace:
    """A tiny demo dataset, its training config, and (for resume cases) a finished one-epoch run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoint(self) -> Path:
        (path,) = (self.root / "saved").rglob("checkpoint_epoch1.pt")
        return path

    @property
    def run(self) -> Path:
        return self.checkpoint.parent.parent

    def edit(self, change: Callable[[dict], object], path: Path | None = None) -> Path:
        """Write the config changed by ``change`` (to ``path``, default the workspace config); returns its path."""
        data = json.loads(self.config.read_text())
        change(data)
        path = path or self.config
        path.write_text(json.dumps(data))
        return path

    def pairs(self, text: str | bytes) -> None:
        target = self.data / "pairs.csv"
        target.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A workspace whose one-epoch training run has finished."""
    root = tmp_path_factory.mktemp("finished")
    tiny_config(root, no_epochs=1)
    train_entry.main(["-c", str(root / "config.json"), "--device", "cpu"])
    return root


@pytest.fixture
def ws(finished_run, tmp_path) -> Workspace:
    """A copy of the finished run's workspace whose config points at the copy's data and save folder."""
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(finished_run, ws.root)
    ws.edit(lambda c: (_set("data_loader.args.data_path", str(ws.data))(c),
                       _set("trainer.save_dir", str(ws.root / "saved"))(c)))
    return ws


def _set(block_path: str, value) -> Callable[[dict], None]:
    """A config edit setting one key (dotted path)."""
    def change(data: dict) -> None:
        *blocks, last = block_path.split(".")
        node = data
        for block in blocks:
            node = node[block]
        node[last] = value
    return change


def training(ws: Workspace, *extra: str) -> tuple[object, list[str]]:
    return train_entry.main, ["-c", str(ws.config), "--device", "cpu", *extra]


def registering(ws: Workspace, *extra: str) -> tuple[object, list[str]]:
    return test_entry.main, ["-c", str(ws.config), "--device", "cpu", *extra]


def resuming(ws: Workspace, *extra: str) -> tuple[object, list[str]]:
    return train_entry.main, ["-r", str(ws.checkpoint), "--device", "cpu", "--set", "trainer.no_epochs=2", *extra]


def edited(key: str, value, entry=training) -> Callable:
    return lambda ws: (ws.edit(_set(key, value)), entry(ws))[1]


def corrupt_nifti(ws: Workspace):
    (ws.data / "sub-02" / "im.nii.gz").write_bytes(b"not a nifti file")
    return training(ws)


def with_affine(path: Path, affine) -> None:
    """Give a .nii.gz file the sform ``affine`` (4, 4) and no qform, as a damaged or hand-made header may."""
    import nibabel as nib

    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    header["qform_code"], header["sform_code"] = 0, 2
    header["srow_x"], header["srow_y"], header["srow_z"] = [list(map(float, row)) for row in affine[:3]]
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))


def header_only(subject: str, shape, entry=registering) -> Callable:
    """A case whose subject's image is its header alone, declaring ``shape``."""
    import nibabel as nib

    def case(ws: Workspace):
        path = ws.data / subject / "im.nii.gz"
        raw = gzip.decompress(path.read_bytes())
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
        header.set_data_shape(shape)
        path.write_bytes(gzip.compress(header.binaryblock + raw[348:352]))
        return entry(ws)
    return case


def image_affine(subject: str, affine, entry=registering) -> Callable:
    def case(ws: Workspace):
        with_affine(ws.data / subject / "im.nii.gz", affine)
        return entry(ws)
    return case


def flipped(subject: str, offset: int, entry=registering) -> Callable:
    """A case whose subject's image has one bit flipped at byte ``offset`` (negative: from the end) of its file."""
    def case(ws: Workspace):
        path = ws.data / subject / "im.nii.gz"
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x10
        path.write_bytes(bytes(raw))
        return entry(ws)
    return case


def truncated_checkpoint(ws: Workspace):
    path = ws.root / "broken.pt"
    path.write_bytes(ws.checkpoint.read_bytes()[:300])
    return registering(ws, "-r", str(path))


def checkpoint_without(key: str, resume: bool = False) -> Callable:
    """test.py with a copy of the checkpoint that lacks ``key``, or (``resume``) train.py resuming the run's own."""
    def case(ws: Workspace):
        state = torch.load(ws.checkpoint, weights_only=True)
        del state[key]
        if resume:
            torch.save(state, ws.checkpoint)
            return resuming(ws)
        torch.save(state, ws.root / "partial.pt")
        return registering(ws, "-r", str(ws.root / "partial.pt"))
    return case


def voxelmorph_checkpoint(ws: Workspace):
    torch.save({"config": {"inshape": [16, 16, 16]}, "model_state": {"flow.weight": torch.zeros(1)}},
               ws.root / "vxm.pt")
    return registering(ws, "-r", str(ws.root / "vxm.pt"))


class _Payload:
    """Runs a shell command when unpickled: what weights_only=True must refuse."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


def malicious_checkpoint(ws: Workspace):
    torch.save({"kind": "learnsim/similarity-metric", "payload": _Payload()}, ws.root / "evil.pt")
    return registering(ws, "-r", str(ws.root / "evil.pt"))


def checkpoint_of_other_features(ws: Workspace):
    ws.edit(_set("model.args.no_features", [4, 4]))
    return registering(ws, "-r", str(ws.checkpoint))


def checkpoint_of_other_metric(ws: Workspace):
    ws.edit(lambda c: (_set("model.type", "CNN_LCC")(c), _set("data_loss.type", "LCC")(c)))
    return registering(ws, "-r", str(ws.checkpoint))


def checkpoint_outside_its_run(ws: Workspace):
    moved = ws.root / "elsewhere" / "checkpoint_epoch1.pt"
    moved.parent.mkdir()
    shutil.copy(ws.checkpoint, moved)
    return train_entry.main, ["-r", str(moved), "--device", "cpu", "--set", "trainer.no_epochs=2"]


def q_v_folder_missing(ws: Workspace):
    shutil.rmtree(ws.run / "q_v")
    return resuming(ws)


def q_v_file_corrupt(ws: Workspace):
    (ws.run / "q_v" / "sub-01_sub-02.epoch1.pt").write_bytes(b"\x00" * 64)
    return resuming(ws)


def q_v_file_other_shape(ws: Workspace):
    path = ws.run / "q_v" / "sub-01_sub-03.epoch1.pt"
    state = torch.load(path, weights_only=True)
    torch.save({k: v[..., :8] if isinstance(v, torch.Tensor) else v for k, v in state.items()}, path)
    return resuming(ws)


def checkpoint_making_demo_data(ws: Workspace):
    """A checkpoint whose config asks for demo data in a folder outside its run (a crafted or edited checkpoint)."""
    state = torch.load(ws.checkpoint, weights_only=True)
    args = state["config"]["data_loader"]["args"]
    args.update(data_path=str(ws.root / "elsewhere"), demo={"no_subjects": 2, "size": 8, "seed": 0})
    torch.save(state, ws.checkpoint)
    return resuming(ws, "--reset-q-v")


def other_config_on_resume(ws: Workspace):
    other = ws.root / "other.json"
    saved = json.loads((ws.run / "config.json").read_text())
    saved["reg_loss"]["args"]["w_reg"] = 0.5
    saved["trainer"]["no_epochs"] = 2
    other.write_text(json.dumps(saved))
    return train_entry.main, ["-c", str(other), "-r", str(ws.checkpoint), "--device", "cpu"]


def finished_resume(ws: Workspace):
    return train_entry.main, ["-r", str(ws.checkpoint), "--device", "cpu"]


def save_dir_is_a_file(ws: Workspace):
    (ws.root / "not_a_folder").write_text("")
    ws.edit(_set("trainer.save_dir", str(ws.root / "not_a_folder")))
    return training(ws)


def two_atlases(ws: Workspace):
    ws.pairs("sub-01,sub-02\nsub-02,sub-03\n")
    return training(ws)


def colliding_pair_ids(ws: Workspace):
    ws.pairs("sub-01,sub-02_x\nsub-01_sub-02,x\n")
    return training(ws)


def broken_labels(ws: Workspace):
    (ws.data / "labels.json").write_text("{not json")
    return registering(ws)


def raw_value(key: str, text: str, entry=training) -> Callable:
    """A case whose config holds ``text`` verbatim as the value of ``key`` (JSON that json.dumps would not write)."""
    def case(ws: Workspace):
        ws.edit(_set(key, "@raw@"))
        ws.config.write_text(ws.config.read_text().replace('"@raw@"', text))
        return entry(ws)
    return case


def config_text(change: Callable[[str], str | bytes], entry=training) -> Callable:
    """A case whose config file is the workspace config's JSON text changed by ``change``."""
    def case(ws: Workspace):
        text = change(ws.config.read_text())
        ws.config.write_bytes(text if isinstance(text, bytes) else text.encode())
        return entry(ws)
    return case


def nested(depth: int) -> dict:
    block = {}
    for _ in range(depth):
        block = {"k": block}
    return block


def pairs_line(text: str, entry=training) -> Callable:
    return lambda ws: (ws.pairs(text), entry(ws))[1]


# (id, case, strings the message must contain); every case gets a copy of the finished run's workspace
CASES = [
    # the config file and its keys
    ("config-missing", lambda ws: (train_entry.main, ["-c", str(ws.root / "nothing.json")]), None,
     ["nothing.json", "does not exist"]),
    ("config-not-json", lambda ws: (ws.config.write_text("{oops"), training(ws))[1], None, ["config.json", "JSON"]),
    ("unknown-key", edited("trainer.no_epoch", 3), None, ["config.json", "trainer.no_epoch", "unknown key"]),
    ("missing-key", lambda ws: (ws.edit(lambda c: c["trainer"].pop("no_iters_q_v")), training(ws))[1], None,
     ["trainer.no_iters_q_v", "missing key"]),
    ("wrong-type", edited("data_loader.args.batch_size", "4"), None, ["data_loader.args.batch_size", "expected int"]),
    ("lr-negative", edited("optimizer_q_phi.args.lr", -0.1), None, ["optimizer_q_phi.args.lr", "> 0"]),
    ("q_v-lr-zero", edited("optimizer_q_v.args.lr", 0), None, ["optimizer_q_v.args.lr", "> 0"]),
    ("q_f-lr-zero", edited("optimizer_q_f.args.lr", 0.0), None, ["optimizer_q_f.args.lr"]),
    ("q_f-sigma-zero", edited("q_f.args.sigma_init", 0), None, ["q_f.args.sigma_init"]),
    ("q_f-u-negative", edited("q_f.args.u_init", -0.1), None, ["q_f.args.u_init"]),
    ("q_v-sigma-zero", edited("data_loader.args.sigma_v_init", 0, registering), None,
     ["data_loader.args.sigma_v_init"]),
    ("q_v-u-negative", edited("data_loader.args.u_v_init", -1, registering), None, ["data_loader.args.u_v_init"]),
    ("w_reg-negative", edited("reg_loss.args.w_reg", -1.0), None, ["reg_loss.args.w_reg", ">= 0"]),
    ("no_steps-zero", edited("transformation_module.args.no_steps", 0), None, ["transformation_module.args.no_steps"]),
    ("no_features-empty", edited("model.args.no_features", []), None, ["model.args.no_features"]),
    ("no_features-zero", edited("model.args.no_features", [4, 0]), None, ["model.args.no_features"]),
    ("sobolev-s-negative", edited("Sobolev_grad.s", -1), None, ["Sobolev_grad.s"]),
    ("sobolev-lambda-zero", edited("Sobolev_grad.lambda", 0), None, ["Sobolev_grad.lambda"]),
    ("noise-negative", edited("trainer.uniform_noise.magnitude", -0.1), None, ["trainer.uniform_noise.magnitude"]),
    ("no_iters-zero", edited("trainer.no_iters_q_v", 0, registering), None, ["trainer.no_iters_q_v"]),
    ("batch_size-zero", edited("data_loader.args.batch_size", 0), None, ["data_loader.args.batch_size"]),
    ("dims-two", edited("data_loader.args.dims", [16, 16]), None, ["data_loader.args.dims"]),
    ("dims-too-small", edited("data_loader.args.dims", [1, 16, 16]), None, ["data_loader.args.dims"]),
    ("no_features-huge", edited("model.args.no_features", [10 ** 11]), None,
     ["out of memory (tried to allocate ", "model.args.no_features"]),
    ("dims-huge", edited("data_loader.args.dims", [100000] * 3), None,
     ["out of memory (tried to allocate ", "data_loader.args.dims"]),
    ("svffd-cps-too-large", edited("transformation_module", {"type": "SVFFD_3D", "args": {"cps": [16, 4, 4]}}), None,
     ["transformation_module.args.cps", "dims"]),
    ("lcc-window-too-large", lambda ws: (ws.edit(lambda c: (_set("model.type", "CNN_LCC")(c),
                                                            _set("data_loss.type", "LCC")(c),
                                                            _set("model.args.s", 8)(c))), training(ws))[1], None,
     ["model.args.s", "window"]),
    ("name-escapes", edited("name", "../../escaped"), None, ["name", "separator"]),
    ("name-empty", edited("name", ""), None, ["name", "empty"]),
    ("name-too-long", edited("name", "n" * 300), None, ["config.json", "name", "255 bytes"]),
    ("im_filename-escapes", edited("data_loader.args.im_filename", "../sub-02/im.nii.gz", registering), None,
     ["data_loader.args.im_filename", ".."]),
    ("seg_filename-absolute", edited("data_loader.args.seg_filename", "/etc/hostname", registering), None,
     ["data_loader.args.seg_filename", "absolute"]),
    ("data_path-missing", edited("data_loader.args.data_path", "no_such_folder"), None, ["data_loader.args.data_path"]),
    ("lr-infinity", edited("optimizer_q_v.args.lr", float("inf")), None,
     ["config.json", "optimizer_q_v.args.lr", "not a finite number"]),
    ("lr-1e400", raw_value("optimizer_q_phi.args.lr", "1e400"), None, ["config.json", "optimizer_q_phi.args.lr", "inf"]),
    ("free-form-nan", raw_value("model.args.activation.args.negative_slope", "NaN", registering), None,
     ["config.json", "model.args.activation.args.negative_slope", "not a finite number"]),
    ("override-infinity", lambda ws: training(ws, "--set", "reg_loss.args.w_reg=Infinity"), None,
     ["reg_loss.args.w_reg", "not a finite number"]),
    ("duplicate-key", config_text(lambda t: t.replace('"no_epochs": 1', '"no_epochs": 1, "no_epochs": 2')), None,
     ["config.json", "trainer.no_epochs", "more than once"]),
    ("data_loss-args-unknown", edited("data_loss.args", {"s": 2}), None,
     ["config.json", "data_loss.args.s", "unknown key"]),
    ("entropy_loss-unknown-type", edited("entropy_loss", {"type": "Gaussian"}), None,
     ["config.json", "entropy_loss.type", "'Gaussian'", "EntropyMultivariateNormal"]),
    ("registration_module-args-unknown", edited("registration_module", {"type": "RegistrationModule",
                                                                         "args": {"x": 1}}), None,
     ["registration_module.args.x", "unknown key"]),
    ("negative_slope-string", edited("model.args.activation.args", {"negative_slope": "abc"}), None,
     ["config.json", "model.args.activation.args.negative_slope", "expected a number"]),
    ("negative_slope-null", edited("model.args.activation.args", {"negative_slope": None}, registering), None,
     ["model.args.activation.args.negative_slope", "expected a number"]),
    ("nested-too-deep", edited("trainer.extra", nested(900)), None, ["config.json", "trainer.extra.k", "nested"]),
    ("nested-beyond-python", config_text(lambda t: t[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"), None,
     ["config.json", "nested"]),
    ("config-too-large", config_text(lambda t: t[:-1] + ', "x": "' + "a" * (1 << 20) + '"}'), None,
     ["config.json", "too large"]),
    ("string-too-long", edited("model.args.activation.args", {"negative_slope": "a" * 5000}), None,
     ["config.json", "model.args.activation.args.negative_slope", "5000 characters"]),
    ("config-not-utf8", config_text(lambda t: t.replace('"name": "', '"name": "\udcff').encode("utf-8",
                                                                                             "surrogateescape")),
     None, ["config.json", "UTF-8"]),
    ("override-nested-beyond-python", lambda ws: training(ws, "--set", "trainer.x=" + "[" * 100000 + "]" * 100000),
     None, ["override trainer.x", "nested"]),
    ("override-not-a-block", lambda ws: training(ws, "--set", "trainer.nope.deeper=1"), None, ["trainer.nope.deeper"]),
    ("override-bad-value", lambda ws: training(ws, "--set", "optimizer_q_v.args.lr=-1"), None,
     ["optimizer_q_v.args.lr"]),
    ("training-a-baseline", lambda ws: training(ws, "--set", "model.args.learnable=false"), None,
     ["model.args.learnable"]),
    # the data
    ("pair-id-escapes", pairs_line("sub-01,../x\n", registering), None, ["pairs.csv", "line 1", "'../x'"]),
    ("pair-id-escapes-train", pairs_line("sub-01,sub-02\nsub-01,../../x\n"), None, ["pairs.csv", "line 2"]),
    ("pair-id-hidden", pairs_line("sub-01,.tmp-x\n", registering), None, ["pairs.csv", "'.tmp-x'"]),
    ("pairs-not-utf8", pairs_line(b"sub-01,sub-0\xff2\n", registering), None, ["pairs.csv", "UTF-8"]),
    ("pairs-three-fields", pairs_line("sub-01,sub-02,sub-03\n", registering), None, ["pairs.csv", "line 1"]),
    ("pairs-empty", pairs_line("\n", registering), None, ["pairs.csv", "no pairs"]),
    ("subject-id-too-long", pairs_line("sub-01," + "s" * 300 + "\n", registering), None,
     ["pairs.csv", "line 1", "255 bytes"]),
    ("pair-id-too-long", pairs_line("sub-01," + "s" * 199 + "\n", registering), None,
     ["pairs.csv", "line 1", "200 bytes"]),
    ("pairs-duplicate", pairs_line("sub-01,sub-02\nsub-01,sub-03\n\nsub-01, sub-02\n", registering), None,
     ["pairs.csv", "line 4", "sub-01,sub-02 is listed again", "line 1"]),
    ("pairs-duplicate-train", pairs_line("sub-01,sub-02\nsub-01,sub-02\n"), None, ["pairs.csv", "line 2"]),
    ("pairs-colliding-ids", colliding_pair_ids, None, ["pairs.csv", "line 2", "same pair ID"]),
    ("subject-missing", pairs_line("sub-01,sub-09\n", registering), None, ["sub-09"]),
    ("image-missing", lambda ws: ((ws.data / "sub-03" / "im.nii.gz").unlink(), registering(ws))[1], None,
     [str(Path("sub-03") / "im.nii.gz")]),
    ("image-corrupt", corrupt_nifti, None, [str(Path("sub-02") / "im.nii.gz")]),
    ("affine-zero", image_affine("sub-01", [[0.0] * 4] * 4), None,
     [str(Path("sub-01") / "im.nii.gz"), "affine is singular"]),
    ("affine-singular", image_affine("sub-02", [[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]],
                                     training), None, [str(Path("sub-02") / "im.nii.gz"), "affine is singular"]),
    ("affine-nan", image_affine("sub-01", [[float("nan")] * 4] * 4), None,
     [str(Path("sub-01") / "im.nii.gz"), "NaN or infinite"]),
    ("affine-inf", image_affine("sub-03", [[1.0, 0, 0, float("inf")], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]),
     None, [str(Path("sub-03") / "im.nii.gz"), "NaN or infinite"]),
    ("image-declares-1000^3", header_only("sub-02", (1000, 1000, 1000)), None,
     [str(Path("sub-02") / "im.nii.gz"), "declares (1000, 1000, 1000) voxels", "the file holds 352"]),
    ("image-zero-axis", header_only("sub-03", (16, 0, 16), training), None,
     [str(Path("sub-03") / "im.nii.gz"), "axis of size 0"]),
    ("gzip-bad-crc", flipped("sub-02", -6), None, [str(Path("sub-02") / "im.nii.gz"), "corrupt gzip data", "CRC"]),
    ("gzip-flipped-bit", flipped("sub-03", -100, training), None,
     [str(Path("sub-03") / "im.nii.gz"), "corrupt gzip data"]),
    ("two-atlases", two_atlases, None, ["data_loader.args.im_pairs", "fixed images"]),
    ("labels-corrupt", broken_labels, None, ["labels.json"]),
    # checkpoints given to test.py
    ("checkpoint-missing", lambda ws: registering(ws, "-r", str(ws.root / "none.pt")), None,
     ["none.pt", "does not exist"]),
    ("checkpoint-truncated", truncated_checkpoint, None, ["broken.pt"]),
    ("checkpoint-without-model", checkpoint_without("model"), None, ["partial.pt", "'model'"]),
    ("checkpoint-without-q_f", checkpoint_without("q_f"), None, ["partial.pt", "'q_f'"]),
    ("resume-checkpoint-without-optimizer", checkpoint_without("optimizer_q_f", resume=True), None,
     ["checkpoint_epoch1.pt", "'optimizer_q_f'"]),
    ("checkpoint-voxelmorph", voxelmorph_checkpoint, None, ["vxm.pt", "VoxelMorph"]),
    ("checkpoint-malicious", malicious_checkpoint, None, ["evil.pt", "weights_only"]),
    ("checkpoint-other-features", checkpoint_of_other_features, None, ["checkpoint_epoch1.pt", "no_features"]),
    ("checkpoint-other-metric", checkpoint_of_other_metric, None, ["checkpoint_epoch1.pt", "LCC"]),
    # resuming
    ("resume-outside-run-folder", checkpoint_outside_its_run, None, ["elsewhere", "layout of a run folder"]),
    ("resume-q_v-missing", q_v_folder_missing, None, ["sub-01_sub-02.epoch1.pt", "missing", "--reset-q-v"]),
    ("resume-q_v-corrupt", q_v_file_corrupt, None, ["sub-01_sub-02.epoch1.pt", "corrupt"]),
    ("resume-q_v-other-shape", q_v_file_other_shape, None, ["sub-01_sub-03.epoch1.pt", "shape"]),
    ("resume-checkpoint-makes-demo-data", checkpoint_making_demo_data, None,
     ["checkpoint_epoch1.pt (config)", "data_loader.args.data_path", "elsewhere", "does not make demo data"]),
    ("resume-other-config", other_config_on_resume, None, ["other.json", "reg_loss.args.w_reg"]),
    ("resume-set-dims", lambda ws: resuming(ws, "--set", "data_loader.args.dims=[8,8,8]"), None,
     ["--set", "data_loader.args.dims"]),
    ("resume-set-unknown", lambda ws: resuming(ws, "--set", "trainer.bogus=1"), None, ["trainer.bogus", "unknown key"]),
    ("resume-set-out-of-range", lambda ws: resuming(ws, "--set", "reg_loss.args.w_reg=-2"), None,
     ["reg_loss.args.w_reg"]),
    ("resume-finished-run", finished_resume, None, ["checkpoint_epoch1.pt", "finished", "trainer.no_epochs"]),
    ("reset-q-v-without-resume", lambda ws: training(ws, "--reset-q-v"), 2, ["--reset-q-v"]),
    # the disk and the device
    ("save_dir-is-a-file", save_dir_is_a_file, None, ["not_a_folder"]),
    pytest.param("device-cuda-without-cuda",
                 lambda ws: (train_entry.main, ["-c", str(ws.config), "--device", "cuda"]), None, ["--device cuda"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
]


def _ids(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots`` with its size and modification time."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            found[str(path)] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return found


def run_case(entry, argv: list[str], capsys) -> tuple[object, str]:
    """Run an entry point as its command line does; returns (exit code, message shown)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(entry, argv)
    captured = capsys.readouterr()
    code = exit_info.value.code
    message = code if isinstance(code, str) else captured.err.strip().splitlines()[-1]
    assert "Traceback" not in captured.err + captured.out
    return code, message


@pytest.mark.parametrize("name, case, expected_code, expected", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input(name, case, expected_code, expected, ws, finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path that escaped would land here, and show in the snapshot
    entry, argv = case(ws)
    before = snapshot(tmp_path, finished_run)
    code, message = run_case(entry, argv, capsys)
    assert code != 0 and code is not None
    if expected_code is not None:
        assert code == expected_code
    else:
        assert isinstance(code, str) and message.startswith("error: ")
    assert "\n" not in message, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert snapshot(tmp_path, finished_run) == before, "a failed start wrote, changed or removed files"
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("entry", ["train", "test"])
def test_full_disk_names_the_file_and_marks_the_run_failed(entry, ws, capsys, monkeypatch):
    """A write that fails with ENOSPC mid-run: one line saying 'no space left' and where; status 'failed'."""
    shutil.rmtree(ws.root / "saved")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # the first file that utils.io opens in training is a q_v state; the first NIfTI of a test run is a registered image
    if entry == "train":
        monkeypatch.setattr("utils.io.open", full, raising=False)
    else:
        monkeypatch.setattr("utils.io.nib.save", full)
    main = train_entry.main if entry == "train" else test_entry.main
    code, message = run_case(main, ["-c", str(ws.config), "--device", "cpu"], capsys)
    assert message.startswith("error: no space left on device: ") and "\n" not in message
    (folder,) = [p for p in (ws.root / "saved").rglob(f"{entry}-*") if p.is_dir()]
    written = Path(message.split(": ", 2)[2])
    assert folder in written.parents, "the message names the file in the run folder"
    assert read_status(folder)["status"] == "failed"
    assert read_status(folder)["message"] == message.removeprefix("error: ")
    assert not list(folder.rglob(".tmp-*")), "a temporary file was left behind"


def test_command_line_exit_status(ws):
    """The real command line: exit status 1 and the one line on stderr."""
    shutil.rmtree(ws.root / "saved")
    ws.pairs(b"sub-01,sub-0\xff2\n")
    argv = [sys.executable, "test.py", "-c", str(ws.config), "--device", "cpu"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "pairs.csv" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (ws.root / "saved").exists()


def test_debug_shows_the_traceback(ws, capsys):
    ws.pairs("sub-01,../x\n")
    with pytest.raises(SystemExit) as exit_info:
        run(test_entry.main, ["-c", str(ws.config), "--device", "cpu", "--debug"])
    assert "pairs.csv" in exit_info.value.code and "Traceback" in capsys.readouterr().err


def _nonfinite_files(folder: Path) -> list[Path]:
    """Files under ``folder`` holding NaN or infinities: NIfTI images and q_v states."""
    import nibabel as nib
    import numpy as np

    found = [p for p in folder.rglob("*.nii.gz") if not np.isfinite(np.asanyarray(nib.load(p).dataobj)).all()]
    for path in folder.rglob("*.epoch*.pt"):
        state = torch.load(path, weights_only=True)
        found += [path] if not all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor)) \
            else []
    return found


@pytest.mark.parametrize("entry, overrides, expected", [
    ("test", ["optimizer_q_v.args.lr=1e6"], ["q_v inference", "data term", "pair sub-01_sub-0", "iteration",
                                              "optimizer_q_v.args.lr"]),
    ("train", ["optimizer_q_v.args.lr=1e6", "trainer.freeze_theta=true"], ["q_v inference", "pair sub-01_sub-0"]),
    ("train", ["optimizer_q_phi.args.lr=1e6"], ["q_v inference", "pair sub-01_sub-0", "iteration 1",
                                                 "the metric (theta)"]),
], ids=["test-q_v-lr", "train-frozen-theta-q_v-lr", "train-theta-lr"])
def test_non_finite_stops_the_run(entry, overrides, expected, ws, capsys):
    """A loss that goes NaN stops the run with one line naming the pair, iteration and term; the status is
    'failed' and no NaN is written as a result (no image, no q_v state, no checkpoint, no summary)."""
    shutil.rmtree(ws.root / "saved")
    main = train_entry.main if entry == "train" else test_entry.main
    argv = ["-c", str(ws.config), "--device", "cpu"] + [arg for item in overrides for arg in ("--set", item)]
    code, message = run_case(main, argv, capsys)
    assert isinstance(code, str) and message.startswith("error: ") and "NaN or infinite" in message, message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    (folder,) = [p for p in (ws.root / "saved").rglob(f"{entry}-*") if p.is_dir()]
    assert read_status(folder) == {**read_status(folder), "status": "failed", "message": message[len("error: "):]}
    assert not _nonfinite_files(folder)
    assert not list(folder.rglob("checkpoint_epoch*.pt")) and not (folder / "summary.json").exists()


def test_divergence_is_reported(ws, capsys):
    """A loss that grows by orders of magnitude (a too large theta lr) is reported as a warning in the log."""
    shutil.rmtree(ws.root / "saved")
    train_entry.main(["-c", str(ws.config), "--device", "cpu", "--set", "optimizer_q_phi.args.lr=100"])
    (log,) = (ws.root / "saved").rglob("train.log")
    assert "theta/loss" in log.read_text() and "may be diverging" in log.read_text()


def test_finite_watch_names_the_first_term_and_pairs():
    """The earliest non-finite iteration is named, with its term (a component before the loss) and its pairs."""
    from trainer.finite import TERMS, FiniteWatch, NonFiniteError

    watch = FiniteWatch("q_v inference", ["a", "b", "c"])
    finite = {key: torch.zeros(3) for key in TERMS}
    watch.update(1, finite)
    bad = {**finite, "reg_term": torch.tensor([0.0, float("inf"), float("nan")]),
           "loss": torch.tensor([0.0, float("inf"), float("nan")])}
    with pytest.raises(NonFiniteError, match="reg term of pairs b, c became NaN or infinite at iteration 2"):
        watch.update(2, bad)



def test_finite_watch_reads_the_device_only_every_period():
    """The deferred read that CUDA uses: nothing is raised between reads, and the read names the first iteration
    and term that went non-finite, not the last."""
    from trainer.finite import TERMS, FiniteWatch, NonFiniteError

    watch = FiniteWatch("q_v inference", ["a", "b"], period=4)
    finite = {key: torch.zeros(2) for key in TERMS}
    watch.update(1, finite)
    watch.update(2, {**finite, "entropy_term": torch.tensor([float("nan"), 0.0]),
                     "loss": torch.tensor([float("nan"), 0.0])})
    watch.update(3, {key: torch.full((2,), float("inf")) for key in TERMS})
    with pytest.raises(NonFiniteError, match="entropy term of pair a became NaN or infinite at iteration 2"):
        watch.update(4, finite)


def test_non_finite_theta_stops_training(ws, capsys, monkeypatch):
    """theta going NaN in its step stops the run before its checkpoint, naming the step, the pair and the weights."""
    from trainer.trainer import Trainer

    shutil.rmtree(ws.root / "saved")
    original = Trainer.theta_step

    def poisoned(self, *args):
        loss = original(self, *args)
        next(self.similarity.parameters()).data.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "theta_step", poisoned)
    code, message = run_case(train_entry.main, ["-c", str(ws.config), "--device", "cpu"], capsys)
    assert message.startswith("error: training stopped at epoch 1, step 1 (pair sub-01_sub-0"), message
    assert "the parameters of theta became NaN or infinite" in message and "\n" not in message
    (folder,) = (ws.root / "saved").rglob("train-*")
    assert read_status(folder)["status"] == "failed" and not list(folder.rglob("checkpoint_epoch*.pt"))


def test_non_finite_voxelmorph_stops_training(tmp_path, capsys):
    """VoxelMorph training with a far too large lr stops with one line naming the step, the pair and the term."""
    from tests.demo_config import tiny_vxm_config

    config = tiny_vxm_config(tmp_path)
    code, message = run_case(train_entry.main, ["-c", str(config), "--device", "cpu", "--set",
                                                "optimizer.args.lr=1e30"], capsys)
    assert message.startswith("error: training stopped at epoch 1, step "), message
    assert "vxm/" in message and "is nan" in message and "\n" not in message
    (folder,) = (tmp_path / "saved").rglob("train-*")
    assert read_status(folder)["status"] == "failed" and not list(folder.rglob("checkpoint_epoch*.pt"))


# a resume that holds its run folder: it stops in its first batch until it is killed
HOLDING_RESUME = """
import sys, time
import train
from trainer.cli import run
from trainer.trainer import Trainer

def hold(self, *args):
    print("training", flush=True)
    time.sleep(600)

Trainer.train_batch = hold
run(train.main, sys.argv[1:])
"""


def test_one_process_per_run_folder(ws, capsys):
    """Two resumes of one checkpoint at once: the second is refused with the first's PID, and changes nothing;
    after the first is killed (kill -9), a resume takes the folder over and finishes."""
    run_folder = ws.run
    argv = ["-r", str(ws.checkpoint), "--device", "cpu", "--set", "trainer.no_epochs=2"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDING_RESUME, *argv], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert any(line.strip() == "training" for line in holder.stdout), "the first resume did not start"
        status, q_v = read_status(run_folder), snapshot(run_folder / "q_v")
        code, message = run_case(train_entry.main, [*argv, "--reset-q-v"], capsys)
        assert message.startswith("error: run folder ") and f"in use by another process (PID {holder.pid}" in message
        assert "\n" not in message and read_status(run_folder) == status and snapshot(run_folder / "q_v") == q_v
    finally:
        holder.kill()
        holder.wait()
    assert train_entry.main(argv) == run_folder / "checkpoints" / "checkpoint_epoch2.pt"
    assert read_status(run_folder)["status"] == "finished" and not (run_folder / "run.lock").exists()


def test_byte_order_marks_are_skipped(ws):
    """A config and a pairs file saved with a UTF-8 byte order mark (as some editors do) read as without one."""
    from data_loader.dataset import read_pairs
    from utils.config import load_config

    ws.pairs("\ufeffsub-01,sub-02\n")
    assert read_pairs(ws.data / "pairs.csv") == [("sub-01", "sub-02")]
    ws.config.write_bytes(b"\xef\xbb\xbf" + ws.config.read_bytes())
    assert load_config(ws.config).name == json.loads(ws.config.read_text(encoding="utf-8-sig"))["name"]


def _limit_file_size() -> None:
    """In the child: files may not grow beyond 64 kB (writes fail with EFBIG, as with ENOSPC on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


def test_a_refused_write_under_torch_names_the_file(ws):
    """A write that the file system refuses inside torch's serialiser (here the file-size limit; a full disk takes
    the same path): one line naming the file, not torch's 'unexpected pos' traceback; the run is marked failed."""
    shutil.rmtree(ws.root / "saved")
    result = subprocess.run([sys.executable, "train.py", "-c", str(ws.config), "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=_limit_file_size,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (folder,) = (ws.root / "saved").rglob("train-*")
    assert line.startswith(f"error: file too large: {folder / 'q_v'}"), line
    assert read_status(folder)["status"] == "failed" and not list(folder.rglob(".tmp-*"))


def _tarball(path: Path, data: bytes, name: str = "net.pt") -> Path:
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("content, expected", [
    (b"x" * 1000, "refused: not tensors and plain containers"),
    (b"abc", "not a torch file"),
], ids=["garbage", "short"])
def test_unreadable_torch_files_are_named_without_unsafe_advice(tmp_path, content, expected):
    """A file that torch.load(weights_only=True) refuses: one line naming it, and never torch's advice to retry
    with weights_only=False (it would run whatever an untrusted file pickles)."""
    from model.voxelmorph import read_authors_checkpoint
    from trainer.checkpoint import read_checkpoint
    from trainer.cli import error_message

    (tmp_path / "net.pt").write_bytes(content)
    for read, path in ((read_authors_checkpoint, _tarball(tmp_path / "net.tar.gz", content)),
                       (read_authors_checkpoint, tmp_path / "net.pt"), (read_checkpoint, tmp_path / "net.pt")):
        with pytest.raises(ValueError) as error:
            read(path)
        message = error_message(error.value)
        assert str(path) in message and expected in message, message
        assert "weights_only=False" not in message.replace("`", "") and "arbitrary code" not in message
