"""utils.config: the demo configs load; every kind of mistake names its key path and file; paths and overrides."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from utils.config import (ConfigError, QVTestConfig, QVTrainConfig, VxmTestConfig, VxmTrainConfig, apply_overrides,
                          load_config, parse_config)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"


def demo_data(name: str = "train.json") -> dict:
    return json.loads((DEMO / name).read_text())


def write(folder: Path, data: dict, name: str = "run.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def set_key(data: dict, key_path: str, value) -> dict:
    data = copy.deepcopy(data)
    *blocks, last = key_path.split(".")
    node = data
    for block in blocks:
        node = node[block]
    node[last] = value
    return data


def delete_key(data: dict, key_path: str) -> dict:
    data = copy.deepcopy(data)
    *blocks, last = key_path.split(".")
    node = data
    for block in blocks:
        node = node[block]
    del node[last]
    return data


def load_error(tmp_path: Path, data: dict) -> str:
    """The message of the ConfigError that loading ``data`` from a file raises."""
    path = write(tmp_path / "configs", data, "broken.json")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "broken.json" in message
    return message


@pytest.mark.parametrize("name", ["train.json", "test.json"])
def test_demo_configs_load(name):
    config = load_config(DEMO / name)
    assert isinstance(config, QVTrainConfig if name == "train.json" else QVTestConfig)
    assert config.source == str(DEMO / name)
    assert config.model.type == "CNN_SSD" and config.data_loss.type == "SSD"
    assert config.model.args.no_features == [4, 8, 8]
    assert config.Sobolev_grad.lambda_ == 0.5 and config.Sobolev_grad.s == 3
    assert config.data_loader.args.dims == [32, 32, 32]
    assert config.data_loader.args.test is (name == "test.json")
    assert config.data_loader.args.data_path == (ROOT / "data" / "demo").resolve()
    assert config.trainer.save_dir == (ROOT / "saved").resolve()
    assert config.data_loader.args.demo.size == 32
    assert isinstance(config.reg_loss.args.w_reg, float)


@pytest.mark.parametrize("name, mode, kind", [
    ("train.json", None, QVTrainConfig), ("test.json", None, QVTestConfig),
    ("train.json", "test", QVTestConfig), ("test.json", "train", QVTrainConfig),
    ("train_vxm.json", None, VxmTrainConfig), ("test_vxm.json", None, VxmTestConfig),
    ("train_vxm.json", "test", VxmTestConfig),
])
def test_the_kind_comes_from_model_type_and_the_entry_point(name, mode, kind):
    """model.type names the method; the entry point (mode), else data_loader.args.test, the mode."""
    config = load_config(DEMO / name, mode=mode)
    assert type(config) is kind
    assert config.method == ("voxelmorph" if "vxm" in name else "q_v")


@pytest.mark.parametrize("key_path, value, expected", [
    ("trainer.bogus", 1, "trainer.bogus"),
    ("bogus_block", {}, "bogus_block"),
    ("data_loader.args.demo.colour", "red", "data_loader.args.demo.colour"),
    ("Sobolev_grad.lambda_", 0.5, "Sobolev_grad.lambda_"),  # the JSON key is 'lambda'
])
def test_unknown_key(tmp_path, key_path, value, expected):
    message = load_error(tmp_path, set_key(demo_data(), key_path, value))
    assert expected in message and "unknown key" in message


@pytest.mark.parametrize("key_path", ["trainer.no_iters_q_v", "model.args.learnable", "reg_loss.args.w_reg",
                                      "data_loader.args.dims", "name", "Sobolev_grad.enabled"])
def test_missing_key(tmp_path, key_path):
    message = load_error(tmp_path, delete_key(demo_data(), key_path))
    assert key_path in message and "missing" in message


@pytest.mark.parametrize("key_path, value", [
    ("trainer.no_iters_q_v", "8"),  # a string for an int
    ("data_loader.args.batch_size", True),  # a bool for an int
    ("trainer.no_iters_q_v", 8.0),  # a float for an int
    ("model.args.learnable", 1),  # an int for a bool
    ("reg_loss.args.w_reg", "1.8"),
    ("reg_loss.args.w_reg", False),
    ("data_loader.args.dims", 32),
    ("data_loader.args.dims", [32, "32", 32]),
    ("data_loader.args.data_path", 5),
    ("trainer.uniform_noise", True),
    ("name", 3),
])
def test_wrong_type(tmp_path, key_path, value):
    message = load_error(tmp_path, set_key(demo_data(), key_path, value))
    assert key_path in message and "expected" in message


@pytest.mark.parametrize("key_path, value", [
    ("data_loss.type", "NCC"),
    ("model.type", "CNN_NCC"),
    ("transformation_module.type", "Affine"),
    ("optimizer_q_v.type", "SGD"),
    ("q_f.args.loc_learnable", True),
    ("q_f.args.loc_learnable", 0),  # 0 == False, but it is not a boolean
    ("q_f.args.cov_learnable", 1),
])
def test_bad_literal(tmp_path, key_path, value):
    message = load_error(tmp_path, set_key(demo_data(), key_path, value))
    assert key_path in message and repr(value) in message


def test_int_is_accepted_for_a_float():
    data = set_key(demo_data(), "reg_loss.args.w_reg", 2)
    config = parse_config(data, DEMO)
    assert config.reg_loss.args.w_reg == 2.0 and isinstance(config.reg_loss.args.w_reg, float)


def test_missing_data_path_without_demo_block(tmp_path):
    data = delete_key(set_key(demo_data(), "data_loader.args.data_path", "no_such_folder"), "data_loader.args.demo")
    message = load_error(tmp_path, data)
    assert "data_loader.args.data_path" in message and "no_such_folder" in message


def test_missing_data_path_is_fine_with_a_demo_block(tmp_path):
    # the demo block makes the data on first use
    data = set_key(demo_data(), "data_loader.args.data_path", "no_such_folder")
    config = load_config(write(tmp_path / "configs", data))
    assert config.data_loader.args.data_path == (tmp_path / "configs" / "no_such_folder").resolve()


def test_model_and_data_loss_must_match(tmp_path):
    message = load_error(tmp_path, set_key(demo_data(), "model.type", "CNN_LCC"))
    assert "model.type" in message and "data_loss.type" in message


@pytest.mark.parametrize("cps", [None, [2, 2], [2, 0, 2]])
def test_svffd_needs_control_point_spacing(tmp_path, cps):
    args = {"no_steps": 12} if cps is None else {"no_steps": 12, "cps": cps}
    data = set_key(demo_data(), "transformation_module", {"type": "SVFFD_3D", "args": args})
    message = load_error(tmp_path, data)
    assert "transformation_module.args.cps" in message


def test_svffd_with_cps_loads_and_svf_rejects_cps(tmp_path):
    data = set_key(demo_data(), "transformation_module", {"type": "SVFFD_3D", "args": {"cps": [2, 3, 4]}})
    assert parse_config(data, DEMO).transformation_module.args.cps == [2, 3, 4]
    data = set_key(demo_data(), "transformation_module.args.cps", [2, 2, 2])
    assert "transformation_module.args.cps" in load_error(tmp_path, data)


@pytest.mark.parametrize("key_path, value", [("data_loader.args.dims", [32, 32]), ("data_loader.args.batch_size", 0),
                                             ("trainer.no_iters_q_v", 0)])
def test_bad_values(tmp_path, key_path, value):
    assert key_path.rsplit(".", 1)[0] in load_error(tmp_path, set_key(demo_data(), key_path, value))


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    data = delete_key(demo_data(), "data_loader.args.demo")
    data = set_key(data, "data_loader.args.data_path", "../data")
    data = set_key(data, "trainer.save_dir", "../runs")
    data = set_key(data, "data_loader.args.labels", "meta/labels.json")
    write(tmp_path / "configs", data)
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    config = load_config(Path("..") / ".." / "configs" / "run.json")
    args = config.data_loader.args
    assert args.data_path == (tmp_path / "data").resolve()
    assert config.trainer.save_dir == (tmp_path / "runs").resolve()
    # the pair list and the label table live in the data folder
    assert args.im_pairs == str((tmp_path / "data" / "pairs.csv").resolve())
    assert args.labels == str((tmp_path / "data" / "meta" / "labels.json").resolve())


def test_absolute_paths_are_kept(tmp_path):
    (tmp_path / "data").mkdir()
    data = delete_key(demo_data(), "data_loader.args.demo")
    data = set_key(data, "data_loader.args.data_path", str(tmp_path / "data"))
    data = set_key(data, "data_loader.args.im_pairs", str(tmp_path / "lists" / "pairs.csv"))
    config = load_config(write(tmp_path / "configs", data))
    assert config.data_loader.args.data_path == (tmp_path / "data").resolve()
    assert config.data_loader.args.im_pairs == str((tmp_path / "lists" / "pairs.csv").resolve())


def test_overrides():
    data = demo_data()
    overridden = apply_overrides(data, ["trainer.no_iters_q_v=8", "data_loader.args.dims=[16, 24, 32]",
                                        "name=my run", "Sobolev_grad.lambda=0.25", "model.args.learnable=false"])
    assert data == demo_data()  # the input is not modified
    assert overridden["trainer"]["no_iters_q_v"] == 8
    assert overridden["data_loader"]["args"]["dims"] == [16, 24, 32]
    assert overridden["name"] == "my run"  # not JSON: kept as a string
    config = parse_config(overridden, DEMO, mode="test")
    assert config.trainer.no_iters_q_v == 8 and config.data_loader.args.dims == [16, 24, 32]
    assert config.Sobolev_grad.lambda_ == 0.25 and config.model.args.learnable is False


@pytest.mark.parametrize("override", ["trainer.nope.deeper=1", "no_block.key=1", "name.sub=1", "trainer.no_iters_q_v"])
def test_bad_override(override):
    with pytest.raises(ConfigError) as error:
        apply_overrides(demo_data(), [override])
    assert override in str(error.value)


def test_override_of_an_unknown_leaf_fails_at_validation(tmp_path):
    path = write(tmp_path / "configs", demo_data())
    with pytest.raises(ConfigError, match=r"trainer\.no_iter_q_v: unknown key"):
        load_config(path, ["trainer.no_iter_q_v=8"])
    with pytest.raises(ConfigError, match=r"trainer\.no_iters_q_v: expected int"):
        load_config(path, ["trainer.no_iters_q_v=eight"])
    assert load_config(path, ["trainer.no_iters_q_v=8"]).trainer.no_iters_q_v == 8


@pytest.mark.parametrize("name", ["train.json", "test.json"])
def test_to_dict_round_trips(tmp_path, name):
    config = load_config(DEMO / name)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-serialisable
    assert "source" not in data and data["Sobolev_grad"]["lambda"] == 0.5
    again = parse_config(data, tmp_path, source=config.source)  # paths are absolute: the base does not matter
    assert again == config
    assert again.to_dict() == data


@pytest.mark.parametrize("key", ["q_f", "optimizer_q_f", "optimizer_q_phi"])
def test_q_v_training_needs_q_f_and_both_optimizers_but_testing_does_not(tmp_path, key):
    data = delete_key(demo_data(), key)
    message = load_error(tmp_path, data)
    assert f"{key}: missing key" in message
    path = write(tmp_path / "configs", data)
    assert isinstance(load_config(path, mode="test"), QVTestConfig)


def test_q_v_training_needs_a_learnable_metric_and_testing_does_not(tmp_path):
    data = set_key(demo_data(), "model.args.learnable", False)
    assert "model.args.learnable" in load_error(tmp_path, data)
    config = load_config(write(tmp_path / "configs", data), mode="test")
    assert config.model.args.learnable is False


@pytest.mark.parametrize("key_path, value", [
    ("trainer.no_iters_q_v", 8),  # q_v keys are unknown to a VoxelMorph run
    ("data_loader.args.sigma_v_init", 0.5),
    ("optimizer_q_v", {"type": "Adam", "args": {"lr": 0.1}}),
    ("model.args.learnable", True),
])
def test_a_voxelmorph_config_refuses_q_v_keys(tmp_path, key_path, value):
    message = load_error(tmp_path, set_key(demo_data("train_vxm.json"), key_path, value))
    assert key_path in message and "unknown key" in message


@pytest.mark.parametrize("key_path", ["data_loss", "reg_loss.args.w_reg", "optimizer", "model.type"])
def test_voxelmorph_training_keys_are_required(tmp_path, key_path):
    message = load_error(tmp_path, delete_key(demo_data("train_vxm.json"), key_path))
    assert key_path in message and "missing" in message


def test_voxelmorph_test_config_needs_only_the_data(tmp_path):
    config = load_config(DEMO / "test_vxm.json")
    assert config.model.args is None and config.data_loss is None and config.optimizer is None
    assert "no_iters_q_v" not in config.to_dict()["trainer"]


def test_metric_checkpoint_of_a_voxelmorph_data_term_resolves_against_the_config(tmp_path):
    data = set_key(demo_data("train_vxm.json"), "data_loss.args.checkpoint", "../metrics/ssd.pt")
    config = load_config(write(tmp_path / "configs", data))
    assert config.data_loss.args.checkpoint == str((tmp_path / "metrics" / "ssd.pt").resolve())
    data = set_key(data, "data_loss.args.checkpoint", "pretrained:SSD_learnt")
    assert load_config(write(tmp_path / "configs", data)).data_loss.args.checkpoint == "pretrained:SSD_learnt"


def test_parsing_never_edits_the_config():
    """test.py registers with the baseline without a checkpoint, but the parsed config stays as written."""
    config = load_config(DEMO / "test.json", mode="test")
    assert config.model.args.learnable is True


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nothing.json")
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model: expected an object"):
        parse_config(set_key(demo_data(), "model", [1, 2]), DEMO)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "VXM").glob("*/*.json")), ids=lambda p: p.stem)
def test_reference_voxelmorph_configs_parse_as_their_kind(path):
    """The VoxelMorph configs read data/ukbiobank beside the repo: parsed here with that folder replaced."""
    data = set_key(json.loads(path.read_text()), "data_loader.args.data_path", str(ROOT))
    mode = "train" if path.stem.startswith("config_train") else "test"
    config = parse_config(data, path.parent, str(path), mode)
    assert type(config) is (VxmTrainConfig if mode == "train" else VxmTestConfig)
    assert config.data_loader.args.dims == [128, 128, 128]
    if mode == "train":
        metric = path.parent.name
        assert config.data_loss.type == metric
        assert config.data_loss.args.checkpoint == (f"pretrained:{metric}_learnt" if "learnt" in path.stem else None)


# the reference's twelve settings (dgrzech/learnsim configs/{SVF,SVFFD}/{SSD,LCC}/), written out here by hand
REFERENCE_W_REG = {("SVF", "SSD"): 1.8, ("SVF", "LCC"): 2.8, ("SVFFD", "SSD"): 1.4, ("SVFFD", "LCC"): 2.0}
REFERENCE_Q_V = {("SVF", "LCC"): (0.02, 1344)}  # (q_v lr, q_v iterations); every other setting: (0.01, 1024)
REFERENCE_RUNS = {"train": (True, 50), "test_baseline": (False, 1), "test_learnt": (True, 1)}  # learnable, epochs


def _get(data: dict, key_path: str):
    node = data
    for key in key_path.split("."):
        assert isinstance(node, dict) and key in node, f"missing key {key_path}"
        node = node[key]
    return node


@pytest.mark.parametrize("model", ["SVF", "SVFFD"])
@pytest.mark.parametrize("metric", ["SSD", "LCC"])
@pytest.mark.parametrize("run", list(REFERENCE_RUNS))
def test_reference_configs_carry_the_reference_values(model, metric, run):
    data = json.loads((ROOT / "configs" / model / metric / f"config_{run}_{metric}.json").read_text())
    learnable, epochs = REFERENCE_RUNS[run]
    lr_q_v, iterations = REFERENCE_Q_V.get((model, metric), (0.01, 1024))
    expected = {
        "reg_loss.args.w_reg": REFERENCE_W_REG[(model, metric)],
        "optimizer_q_v.args.lr": lr_q_v, "trainer.no_iters_q_v": iterations, "trainer.no_epochs": epochs,
        "data_loader.args.batch_size": 5, "data_loader.args.dims": [128, 128, 128],
        "data_loader.args.sigma_v_init": 0.5, "data_loader.args.u_v_init": 0.1,
        "trainer.uniform_noise.enabled": True, "trainer.uniform_noise.magnitude": 0.1,
        "trainer.no_samples_test": 5, "Sobolev_grad.enabled": True, "Sobolev_grad.s": 3, "Sobolev_grad.lambda": 0.5,
        "model.args.learnable": learnable, "model.type": f"CNN_{metric}", "data_loss.type": metric,
        "transformation_module.type": f"{model}_3D",
    }
    if model == "SVFFD":
        expected["transformation_module.args.cps"] = [2, 2, 2]
    if model == "SVF" or "no_steps" in data["transformation_module"].get("args", {}):
        expected["transformation_module.args.no_steps"] = 12
    if metric == "LCC":
        expected["model.args.s"] = 1
    if learnable:
        expected.update({"optimizer_q_phi.args.lr": 1e-5, "optimizer_q_f.args.lr": 1e-3, "q_f.args.sigma_init": 0.1,
                         "q_f.args.u_init": 0.1, "model.args.no_features": [4, 8, 8],
                         "model.args.activation.args.negative_slope": 0.2})
    found = {key: _get(data, key) for key in expected}
    assert found == expected
    assert "cps" not in data["transformation_module"].get("args", {}) or model == "SVFFD"
    assert _get(data, "model.args").get("lcc_form", "reference") == "reference"


def test_the_theta_loss_is_the_contrastive_one_unless_a_config_names_another():
    config = load_config(DEMO / "train.json")
    assert (config.theta_loss.type, config.theta_loss.args) == ("contrastive", {})
    assert config.to_dict()["theta_loss"] == {"type": "contrastive", "args": {}}
    assert load_config(DEMO / "test.json").theta_loss is None
    ranking = load_config(DEMO / "train.json", ['theta_loss={"type": "alignment_ranking", "args": {"spacing": 2}}'])
    assert ranking.theta_loss.args == {"no_perturbations": 2, "magnitude": 0.5, "spacing": 2, "temperature": 1.0}
    assert ranking.theta_loss.alignment_ranking.spacing == 2
    again = parse_config(ranking.to_dict(), DEMO, source=ranking.source)
    assert again == ranking and again.to_dict() == ranking.to_dict()


@pytest.mark.parametrize("theta_loss, expected", [
    ({"type": "langevin"}, "theta_loss.type: 'langevin' is not one of ['contrastive', 'alignment_ranking']"),
    ({"type": "contrastive", "args": {"temperature": 1}}, "theta_loss.args: the contrastive theta loss takes no args"),
    ({"type": "alignment_ranking", "args": {"margin": 1}}, "theta_loss.args.margin: unknown key"),
    ({"type": "alignment_ranking", "args": {"temperature": 0}}, "theta_loss.args.temperature: must be > 0"),
    ({"type": "alignment_ranking", "args": {"no_perturbations": 0}}, "theta_loss.args.no_perturbations: must be >= 1"),
    ({"type": "alignment_ranking", "args": {"spacing": 2.5}}, "theta_loss.args.spacing: expected int"),
    ({"type": "alignment_ranking", "args": {"magnitude": -1}}, "theta_loss.args.magnitude: must be > 0"),
    ({"type": "alignment_ranking", "args": []}, "theta_loss.args: expected dict, got list"),
])
def test_a_bad_theta_loss_names_its_key(tmp_path, theta_loss, expected):
    assert expected in load_error(tmp_path, set_key(demo_data(), "theta_loss", theta_loss))
