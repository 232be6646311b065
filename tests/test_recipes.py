"""Recipes: YAML configs shipped in the package (`cascadevision/configs/`, `configs/` in a checkout), found by
name, and `cascadevision config` printing a resolved config that `train` reads back."""
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from cascadevision.cli import main
from cascadevision.config import Config, to_dict
from cascadevision.demo import demo_config
from cascadevision.presets import RECIPES_DIR, load_config, recipe_names

REPO = Path(__file__).parents[1]


def plain(cfg) -> dict:
    return json.loads(json.dumps(to_dict(cfg)))  # tuples -> lists, as in the captured file


def test_demo_recipe_gives_the_config_the_demo_trained_with_before_it_moved_to_yaml():
    # captured from demo.demo_config(Path("DATA_DIR"), preset, max_iters, seed) before the recipe became a YAML
    # file: the same model, data and schedule for both models the demo trains, at several lengths and seeds
    before = json.loads((Path(__file__).parent / "data" / "demo_config_before_recipe.json").read_text())
    assert len(before) == 12
    for key, expected in before.items():
        preset, max_iters, seed = key.split("/")
        assert as_captured(demo_config(Path("DATA_DIR"), preset, int(max_iters), int(seed))) == expected, key
    # without --max-iters the demo trains the recipe's 460 iterations
    assert as_captured(demo_config(Path("DATA_DIR"), "htc_r18_fpn")) == before["htc_r18_fpn/460/0"]


def as_captured(cfg) -> dict:
    """`plain(cfg)` in the capture's layout: keys added since then must hold their defaults and are left out;
    `train.amp` was a boolean then (false is "none" now)."""
    values, defaults = plain(cfg), plain(Config())

    def strip(node: dict, default: dict, captured: dict) -> dict:
        out = {}
        for key, value in node.items():
            if key not in captured:
                assert value == default[key], f"{key}: a key added since the capture must hold its default"
            elif isinstance(value, dict) and isinstance(captured[key], dict):
                out[key] = strip(value, default[key], captured[key])
            else:
                out[key] = value
        return out

    layout = json.loads((Path(__file__).parent / "data" / "demo_config_before_recipe.json").read_text())
    out = strip(values, defaults, next(iter(layout.values())))
    out["train"]["amp"] = {"none": False}.get(out["train"]["amp"], out["train"]["amp"])
    return out


def test_demo_recipe_read_by_name_path_and_checkout_dir_is_one_file():
    by_name = plain(load_config("demo_htc_r18"))
    assert plain(load_config(RECIPES_DIR / "demo_htc_r18.yaml")) == by_name
    assert plain(load_config(REPO / "configs" / "demo_htc_r18.yaml")) == by_name
    assert (REPO / "configs").resolve() == RECIPES_DIR.resolve()
    assert by_name["model"]["preset"] == "htc_r18_fpn" and by_name["train"]["max_iters"] == 460
    assert by_name["model"]["backbone"]["base_channels"] == 32 and by_name["train"]["optimizer"] == "adamw"


def test_a_recipe_name_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name is found in the package
    assert load_config("demo_htc_r18").train.lr == 1.5e-3


@pytest.mark.parametrize("name", ["htc_r50_fpn_1x", "htc_r50_fpn_20e"])
def test_reference_schedule_files_equal_their_presets(name):
    # the file writes the schedule out; it must be exactly the preset's (MMDetection's 1x / 20e)
    assert plain(load_config(RECIPES_DIR / f"{name}.yaml")) == plain(load_config(name))
    train = load_config(RECIPES_DIR / f"{name}.yaml").train
    assert (train.epochs, tuple(train.lr_steps)) == {"htc_r50_fpn_1x": (12, (8, 11)),
                                                      "htc_r50_fpn_20e": (20, (16, 19))}[name]


def test_recipes_are_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.relative_to(REPO / "cascadevision").as_posix()
               for pattern in patterns["cascadevision"] for p in (REPO / "cascadevision").glob(pattern)}
    recipes = {name for name in shipped if name.startswith("configs/")}
    assert recipes == {f"configs/{name}.yaml" for name in recipe_names()} and "configs/demo_htc_r18.yaml" in recipes
    assert shipped - recipes == {"serve/index.html"}  # and the server's page


def test_config_command_prints_the_resolved_config_that_train_reads_back(tmp_path, capsys):
    assert main(["config", "demo_htc_r18", "--set", "train.lr=0.01", "--set", "data.batch_size=2"]) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert values["train"]["lr"] == 0.01 and values["data"]["batch_size"] == 2
    assert values["train"]["max_iters"] == 460 and values["model"]["neck"]["out_channels"] == 64
    assert set(values) == {"model", "data", "train"} and "rpn" in values["model"]  # every section, in full
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    assert plain(load_config(saved)) == plain(load_config("demo_htc_r18", ["train.lr=0.01", "data.batch_size=2"]))


def test_config_command_on_a_preset_and_an_unknown_name(capsys):
    assert main(["config", "htc_r50_fpn_20e"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr_steps"] == [16, 19]
    assert main(["config", "no_such_thing"]) == 2
    error = capsys.readouterr().err
    assert "no_such_thing" in error and "demo_htc_r18" in error and "htc_r18_fpn" in error
