"""Params validation: unknown keys, wrong types and out-of-range values name the key."""

import pytest
import yaml

from mmcoa.config import Params, ParamsError, load_params, parse_override, parse_params


def test_repo_params_file_is_valid():
    p = load_params("params.yaml")
    assert isinstance(p, Params)
    assert {"tecoa", "pmg_aft", "fare", "mmcoa"} <= set(p.finetune.methods)
    assert {s.name for s in p.evaluate.suite} >= {"image", "text", "multimodal"}
    assert p.data.dataset in p.evaluate.datasets and p.base.pretrain is not None
    assert load_params("params/paper.yaml").base.pretrain is None  # a pretrained CLIP is never re-trained


@pytest.mark.parametrize(
    "tree, key",
    [
        ({"finetune": {"lr": "fast"}}, "finetune.lr"),
        ({"finetune": {"lrr": 1e-5}}, "finetune.lrr"),
        ({"finetune": {"image_attack": {"attack": "pgd", "weight": -1}}}, "finetune.image_attack: weight"),
        ({"data": {"n_train": 0}}, "data.n_train"),
        ({"evaluate": {"suite": [{"name": "Bad Name", "attack": "pgd"}]}}, "evaluate.suite.0.name"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_errors_name_the_key(tree, key):
    with pytest.raises(ParamsError) as err:
        parse_params(tree)
    assert key in str(err.value)


def test_unknown_key_message_says_so():
    with pytest.raises(ParamsError, match="unknown key"):
        parse_params({"finetune": {"stepz": 3}})


def test_duplicate_suite_names_rejected():
    spec = {"name": "image", "attack": "pgd"}
    with pytest.raises(ParamsError, match="repeated"):
        parse_params({"evaluate": {"suite": [spec, spec]}})


def test_overrides_and_dotted_sets(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"finetune": {"overrides": {"fare": {"image_attack": {"params": {"eps_255": 4}}}}}}))
    p = load_params(path, dict([parse_override("finetune.lr=0.001"), parse_override("finetune.steps=7")]))
    assert p.finetune.lr == 1e-3 and p.finetune.steps == 7
    fare = p.finetune.recipe("fare").params.image_attack
    assert fare.params["eps_255"] == 4 and fare.params["steps"] == p.finetune.image_attack.params["steps"]  # merged
    assert p.finetune.recipe("mmcoa").params.image_attack == p.finetune.image_attack


def test_params_are_frozen():
    p = parse_params({})
    with pytest.raises(Exception):
        p.seed = 3


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [unclosed")
    with pytest.raises(ParamsError, match="YAML"):
        load_params(bad)
