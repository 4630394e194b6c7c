"""The shared conventions (contract.py) and saved run configurations read back with checks."""

from __future__ import annotations

import json

import pytest

from fmabs_core import contract, methods
from fmabs_core.errors import InputError
from fmabs_core.training.api import Outcome
from fmabs_core.training.config import NetConfig, TrainConfig


def test_parse_classes():
    assert contract.parse_classes("1:left atrium, 2:scar") == {1: "left atrium", 2: "scar"}
    assert contract.parse_classes("liver; spleen") == {1: "liver", 2: "spleen"}
    assert contract.parse_classes("") == {1: "foreground"}
    for bad in ("x:liver", "0:bg", "255:x", "1:a,1:b"):
        with pytest.raises(ValueError):
            contract.parse_classes(bad)


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", ".hidden", "a\\b", "x" * 200])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ValueError, match="not usable as a folder name"):
        contract.check_name(name)


def test_train_args_round_trip_through_the_parser():
    from fmabs_core.cli import build_parser

    argv = contract.train_args("/p", "r1", "fmabs", {"iterations": 12, "device": "cpu", "generalist": "litemedsam",
                                                     "patch_size": (16, 16, 16), "no_augment": True, "budget": None})
    args = build_parser().parse_args(argv)
    assert (args.method, args.iterations, args.patch_size, args.no_augment) == ("fmabs", 12, [16, 16, 16], True)
    assert args.method_option_generalist == "litemedsam" and not hasattr(args, "budget")


def test_outcome_exit_codes():
    assert Outcome("done").exit_code == contract.EXIT_OK
    assert Outcome("cancelled").exit_code == contract.EXIT_CANCELLED
    assert Outcome("waiting_for_labels").exit_code == contract.EXIT_NEEDS_LABELS
    assert Outcome("failed", exception=RuntimeError("x")).exit_code == contract.EXIT_FAILED
    assert Outcome("failed", exception=InputError("x")).exit_code == contract.EXIT_USAGE
    with pytest.raises(ValueError):
        Outcome("finished")


def test_saved_config_round_trip_and_unknown_keys(tmp_path):
    cfg = TrainConfig(method="fmabs", method_options={"fusion": "ua"}, patch_size=(32, 32, 16),
                      net=NetConfig(width=8))
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert TrainConfig.load(path) == cfg
    data = json.loads(cfg.to_json())
    data["learning_rate"] = 0.1
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="'learning_rate'"):
        TrainConfig.load(path)
    data = json.loads(cfg.to_json())
    data["net"]["widht"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="'widht'"):
        TrainConfig.load(path)
    for bad in ({"iterations": "many"}, {"patch_size": [1, 2]}, {"lr": float("nan")}, {"augment": 1}):
        path.write_text(json.dumps({**json.loads(cfg.to_json()), **bad}))
        with pytest.raises(InputError, match=next(iter(bad))):
            TrainConfig.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        TrainConfig.load(path)


def test_method_options_are_checked_by_the_method():
    with pytest.raises(InputError, match="'fusoin'"):
        methods.get_method("fmabs", {"fusoin": "mv"})
    with pytest.raises(InputError, match="'ema'"):
        methods.get_method("mt", {"ema": "high"})
    with pytest.raises(InputError, match="unknown method 'nope'"):
        methods.get_method("nope")
    assert methods.get_method("fmabs", {"fusion": "ua"}).config.fusion == "ua"


def test_every_method_is_described_for_the_front_ends(capsys):
    from fmabs_core.cli import main

    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in listed]
    assert {"sup", "sup-dense", "mt", "fmabs"} <= set(names)
    assert all(m["description"] and m["supervision"] in ("cross", "dense") for m in listed)
    fm = next(m for m in listed if m["name"] == "fmabs")
    assert any(o["name"] == "generalist" and o["default"] == "litemedsam" for o in fm["options"])


def test_resume_refuses_changed_options_and_names_them(tmp_path, phantom_data, capsys):
    from fmabs_core.cli import main

    proj = tmp_path / "p"
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    assert main(["crosslabel", "simulate", "--project", str(proj), "--count", "2"]) == 0
    run = proj / "runs" / "r"
    run.mkdir(parents=True)
    saved = TrainConfig(method="sup", iterations=40, device="cpu", net=NetConfig(out_channels=2))
    (run / "config.json").write_text(saved.to_json())
    from fmabs_core.cli.train_cmds import config_from_args
    from fmabs_core.cli import build_parser
    from fmabs_core.data.project import Project

    def cfg(*extra: str) -> TrainConfig:
        args = build_parser().parse_args(["train", "--project", str(proj), "--run", "r", *extra])
        return config_from_args(args, Project(proj))

    assert cfg() == saved  # the bare command resumes with the saved options
    assert cfg("--device", "cuda", "--val-every", "7").val_every == 7  # options that may change
    with pytest.raises(InputError, match=r"iterations: saved 40, now 50"):
        cfg("--iterations", "50")
    with pytest.raises(InputError, match=r"method: saved 'sup', now 'mt'"):
        cfg("--method", "mt")
    with pytest.raises(InputError, match="--fusion is an option of method"):
        cfg("--fusion", "ua")
    assert main(["train", "--project", str(proj), "--run", "r", "--iterations", "50"]) == 2
    assert "iterations: saved 40, now 50" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--iterations", "0"), ("--batch-size", "0"), ("--lr", "nan"),
                                          ("--lr", "-1"), ("--dropout", "2"), ("--labelled-batch-size", "9"),
                                          ("--keep-last", "0"), ("--width", "0"), ("--patch-size", "0 16 16")])
def test_bad_training_values_are_refused_by_name(tmp_path, phantom_data, option, value, capsys):
    from fmabs_core.cli import main

    proj = tmp_path / "p"
    assert main(["import", str(phantom_data), "--project", str(proj)]) == 0
    assert main(["train", "--project", str(proj), "--run", "r", option, *value.split()]) == 2
    assert option in capsys.readouterr().err
    assert not (proj / "runs" / "r" / "config.json").exists()


def test_the_optimiser_defaults_follow_the_method_and_a_saved_run_keeps_its_own(tmp_path):
    """sam-lora gets AdamW's 1e-4 on 2 crops (SGD's 0.01, its default before, collapsed the tuned generalist);
    the 3D methods keep SGD's 0.01 on 4; a run saved with other values resumes with them."""
    assert (TrainConfig(method="sam-lora").lr, TrainConfig(method="sam-lora").batch_size) == (1e-4, 2)
    for method in ("sup", "mt", "fmabs", "cfr-mt"):
        assert (TrainConfig(method=method).lr, TrainConfig(method=method).batch_size) == (0.01, 4)
    assert TrainConfig(method="sam-lora", lr=0.003, batch_size=3).lr == 0.003
    old = TrainConfig(method="sam-lora", lr=0.01, batch_size=4)
    path = tmp_path / "config.json"
    path.write_text(old.to_json())
    assert (TrainConfig.load(path).lr, TrainConfig.load(path).batch_size) == (0.01, 4)
