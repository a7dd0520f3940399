"""Settings are checked when read: each kind of mistake names its dotted path, the value, what is allowed
and the closest known name, and a flow stops on it before any step starts."""
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from conftest import FLOW, METAFLOW_ROOT

from gallery.cli import main
from gallery.config import SettingsError, Settings, load_settings, settings_from_dict, settings_json
from gallery.evaluation.seeds import with_seed
from gallery.model.backbones import BACKBONES
from gallery.model.weightings import WEIGHTINGS
from gallery.model.pooling import POOLINGS


def problem(values: dict) -> str:
    with pytest.raises(SettingsError) as caught:
        settings_from_dict(values)
    return str(caught.value)


def test_a_misspelt_pooling_names_the_path_the_value_and_every_pooling():
    text = problem({"model": {"pooling": "avrage"}})
    assert '- model.pooling = "avrage": not a known pooling; allowed: ' in text
    assert all(name in text for name in POOLINGS)


def test_an_unknown_backbone_suggests_the_closest():
    text = problem({"model": {"backbone": "vgg61"}})
    assert 'model.backbone = "vgg61"' in text and "did you mean `vgg16`?" in text
    assert all(name in text for name in BACKBONES)


def test_a_misspelt_weighting_in_a_list_names_its_position():
    text = problem({"train": {"weightings": ["pseudo_uniform", "kendal"]}})
    assert 'train.weightings[1] = "kendal": not a known weighting' in text and "did you mean `kendall`?" in text
    assert all(name in text for name in WEIGHTINGS)


def test_names_come_from_the_registries(monkeypatch):
    """A method added to a registry is a valid setting at once, with no edit to the settings."""
    monkeypatch.setitem(POOLINGS, "gated_attention", POOLINGS["mean"])
    assert settings_from_dict({"model": {"pooling": "gated_attention"}}).model.pooling == "gated_attention"
    assert "did you mean `gated_attention`?" in problem({"model": {"pooling": "gated_atention"}})


def test_a_reference_weighting_that_is_not_trained():
    text = problem({"train": {"weightings": ["kendall"]}})  # the default reference is pseudo_uniform
    assert 'train.reference_weighting = "pseudo_uniform": not one of train.weightings' in text
    assert "allowed: kendall" in text


def test_an_unknown_precision_and_image_format():
    text = problem({"train": {"precision": "fp8"}, "data": {"image_format": "jpg"}})
    assert text.startswith("settings: 2 problems")
    assert 'train.precision = "fp8": not a known precision; allowed: auto, bf16, fp32' in text
    assert 'data.image_format = "jpg": not a known image format; allowed: jpeg, png, webp (did you mean `jpeg`?)' in text


def test_an_unknown_binary_code():
    text = problem({"retrieval": {"curve_codes": ["sign", "itq0"]}})
    assert 'retrieval.curve_codes[1] = "itq0": not a known binary code; allowed: itq<bits>, median, sign' in text


def test_an_unknown_key_lists_the_section_keys_and_the_closest():
    text = problem({"resources": {"train": {"memroy": 9000}}})
    assert "resources.train.memroy: unknown key; allowed: cpu, memory, gpu, disk, shared_memory" in text
    assert "did you mean `memory`?" in text
    assert "modle: unknown key" in problem({"modle": {}}) and "did you mean `model`?" in problem({"modle": {}})


def test_wrong_types():
    assert 'train.lr = "fast": expected a number' in problem({"train": {"lr": "fast"}})
    assert "train.max_epochs = 2.5: expected a whole number" in problem({"train": {"max_epochs": 2.5}})
    assert 'train.use_cache = "yes": expected true or false' in problem({"train": {"use_cache": "yes"}})
    assert "model = 3: expected an object with keys backbone, weights" in problem({"model": 3})


def test_values_out_of_range():
    assert "train.lr = -0.001: out of range; allowed: a value > 0" in problem({"train": {"lr": -0.001}})
    assert "train.workers = 0: out of range; allowed: a value >= 1" in problem({"train": {"workers": 0}})
    assert "evaluation.holdout_fractions[1] = 1.5: out of range; allowed: a value <= 1" in problem(
        {"evaluation": {"holdout_fractions": [0.5, 1.5]}})
    assert "resources.train.gpu = -1: out of range; allowed: a value >= 0" in problem({"resources": {"train": {"gpu": -1}}})


def test_the_split_shares_leave_products_to_train():
    text = problem({"data": {"split": {"valid": 0.5, "test": 0}}})
    assert "data.split.valid = 0.5: out of range; allowed: a value < 0.5" in text
    assert "data.split.test = 0: out of range; allowed: a value > 0" in text
    assert settings_from_dict({"data": {"split": {"test": 0.2}}}).data.split.valid == 0.1  # the other keeps its default


def test_the_synthetic_catalogue_settings_are_checked_too():
    text = problem({"data": {"synth": {"min_images": 5, "max_images": 2, "galaxies": 10}}})
    assert "data.synth.max_images = 2: fewer than min_images (5)" in text
    assert "data.synth.galaxies: unknown key" in text and "did you mean `galleries`?" in text


def test_every_problem_is_reported_at_once():
    text = problem({"model": {"pooling": "avrage", "hidden": 0}, "train": {"lr": "fast"}, "bogus": 1})
    assert text.startswith("settings: 4 problems") and text.count("\n- ") == 4


def test_a_file_that_is_not_json():
    with pytest.raises(SettingsError, match=r"settings: not valid JSON: .* line 1 column 14"):
        settings_json('{"name": "x",}')


def test_the_primary_held_out_task_is_a_setting_resolved_in_one_place():
    """evaluation.primary_task: the paper's star rating where the catalogue holds it out, else the first
    held-out task; a task the catalogue does not hold out fails with the ones it does."""
    from gallery.config import primary_task

    assert primary_task(Settings(), ["has_spa", "star_rating"]) == "star_rating"
    assert primary_task(Settings(), ["has_spa", "decor_style"]) == "has_spa" and primary_task(Settings(), []) is None
    chosen = settings_from_dict({"evaluation": {"primary_task": "stars"}})
    assert primary_task(chosen, ["star_rating", "stars"]) == "stars"
    with pytest.raises(SettingsError, match=r'evaluation.primary_task = "stars": not a held-out task.*allowed: has_spa'):
        primary_task(chosen, ["has_spa"])


def test_the_trained_models_are_identities_made_from_the_settings():
    """Every weighting x pooling (the preset's pooling first), with a seed; the reference model among them."""
    from gallery.config import preset_models, reference_model, trained_models
    from gallery.model.identity import ModelIdentity

    study = load_settings("study")
    models = trained_models(study, seed=3)
    assert len(models) == len(study.train.weightings) * (1 + len(study.train.poolings)) and len(set(models)) == len(models)
    assert {m.seed for m in models} == {3} and models[0] == ModelIdentity(
        study.train.weightings[0], study.model.pooling, 3, study.model.backbone)
    assert [m.pooling for m in preset_models(study)] == [study.model.pooling] * len(study.train.weightings)
    assert reference_model(study) in preset_models(study) and reference_model(study).seed == study.train.seed


def test_the_presets_are_valid_and_replace_checks_new_values():
    for name in ("smoke", "default", "study", "paper"):
        assert load_settings(name).name == name
    settings = load_settings("smoke")
    assert with_seed(settings, 3).train.seed == 3 and with_seed(settings, 3).model == settings.model
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        replace(settings.train, max_epochs=0)


def test_the_flows_parser_returns_complete_settings():
    complete = settings_json('{"name": "mine", "train": {"lr": 0.01}}')
    assert complete["train"]["lr"] == 0.01 and complete["resources"]["train"]["memory"] == 4096
    assert settings_from_dict(complete) == replace(Settings(), name="mine", train=replace(Settings().train, lr=0.01))


def test_validate_checks_a_settings_file_without_running(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"pooling": "avrage"}}))
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"gallery validate: settings {bad}: 1 problem" in err and 'model.pooling = "avrage"' in err
    assert main(["validate", "--config", "smoke"]) == 0
    assert capsys.readouterr().out.startswith("settings smoke: ok (efficientnet_lite0 at 32 px, mean pooling")


@pytest.mark.flow
def test_a_flow_stops_on_bad_settings_before_any_step(tmp_path):
    """Metaflow parses the settings before the run starts: the flow exits with the problem as its error
    headline, with no traceback and no run created."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "model": {"pooling": "avrage"}}))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, FLOW, "--config", "settings", str(bad), "run"], capture_output=True,
                          text=True, cwd=METAFLOW_ROOT, env=os.environ | {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path)})
    seconds = time.perf_counter() - started
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Settings error" in out and 'model.pooling = "avrage": not a known pooling; allowed: gated_attention, gem, max, mean, pma' in out
    assert "Traceback" not in out and "Workflow starting" not in out
    assert not (tmp_path / ".metaflow").exists()  # no run was created
    print(f"bad settings stopped the flow after {seconds:.1f} s (imports included)")
