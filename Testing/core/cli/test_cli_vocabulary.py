"""One vocabulary across the ``fmabs`` command: fast top-level help, ``--json PATH``, ``--overwrite``."""

from __future__ import annotations

import subprocess
import sys


def test_top_level_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom fmabs_core.cli import COMMAND_MODULES, main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("NO-TORCH"), done.stdout[-300:]
    for command in ("import", "train", "predict", "pseudo-label", "reproduce", "web", "demo"):
        assert command in done.stdout


def _leaf_parsers(parser, prefix="fmabs"):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, f"{prefix} {name}")


def _options(parser) -> dict:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def test_every_json_option_is_a_path_or_dash_and_comes_with_overwrite():
    from fmabs_core.cli import build_parser
    from fmabs_core.cli.common import STDOUT

    with_json = []
    for command, parser in _leaf_parsers(build_parser()):
        options = _options(parser)
        if "--json" not in options:
            continue
        with_json.append(command)
        action = options["--json"]
        assert action.nargs == "?" and action.const == STDOUT and action.metavar == "PATH", command
        assert "--overwrite" in options, f"{command}: --json writes a file, so it needs --overwrite"
    assert {"fmabs methods", "fmabs evaluate", "fmabs jobs status", "fmabs jobs list", "fmabs tile-grid",
            "fmabs bench suite", "fmabs bench teachers", "fmabs bench ceiling"} <= set(with_json)


def test_json_to_a_file_refuses_an_existing_one_and_dash_prints(tmp_path, capsys):
    import json

    from fmabs_core.cli import main

    out = tmp_path / "methods.json"
    assert main(["methods", "--json", str(out)]) == 0
    names = {m["name"] for m in json.loads(out.read_text())}
    assert {"sup", "fmabs"} <= names
    capsys.readouterr()
    out.write_text("mine")
    assert main(["methods", "--json", str(out)]) == 2
    assert "--json" in capsys.readouterr().err and out.read_text() == "mine"  # never overwritten silently
    assert main(["methods", "--json", str(out), "--overwrite"]) == 0 and json.loads(out.read_text())
    capsys.readouterr()
    for argv in (["methods", "--json", "-"], ["methods", "--json"]):
        assert main(argv) == 0
        assert {m["name"] for m in json.loads(capsys.readouterr().out)} == names


#: former names, kept one release as hidden aliases -> the one name now used across commands
RENAMED = {"--checkpoint": "--generalist-checkpoint", "--jitter": "--box-jitter", "--points": "--n-points",
           "--max-slices": "--pseudo-max-slices", "--round-slices": "--pseudo-max-slices", "--strategy": "--active",
           "-k": "--active-k", "--force": "--overwrite"}


def test_one_name_per_concept_and_the_old_names_are_hidden_aliases(capsys):
    import argparse

    from fmabs_core.cli import build_parser

    for command, parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            visible = action.help != argparse.SUPPRESS
            for old in set(action.option_strings) & set(RENAMED):
                assert not visible, f"{command}: {old} is shown; the name is {RENAMED[old]}"
        help_text = parser.format_help()
        for old in RENAMED:
            assert f" {old} " not in help_text and f"[{old} " not in help_text, f"{command} --help shows {old}"
    args = build_parser(light=True).parse_args(["suggest", "--project", "p", "--run", "r", "--strategy", "lc",
                                                 "-k", "3"])
    assert (args.active, args.active_k) == ("lc", 3)
    err = capsys.readouterr().err
    assert "--strategy is now --active" in err and "-k is now --active-k" in err
    args = build_parser(light=True).parse_args(["pseudo-label", "--image", "i", "--output", "o", "--jitter", "3",
                                                 "--checkpoint", "w.pth"])
    assert (args.box_jitter, args.generalist_checkpoint) == (3, "w.pth")


def test_device_is_described_once():
    from fmabs_core.cli import build_parser
    from fmabs_core.contract import DEVICE_HINT

    for command, parser in _leaf_parsers(build_parser()):
        device = _options(parser).get("--device")
        if device is not None:
            assert device.help.startswith(DEVICE_HINT), f"{command}: --device says {device.help!r}"


def test_a_reader_that_closes_early_is_a_normal_end():
    """`fmabs methods --json | head -c 1`: the reader closes the pipe; fmabs exits 0 without a crash report.
    (Before: "internal error (BrokenPipeError)" and exit 1.)"""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before fmabs writes a byte
    try:
        done = subprocess.run([sys.executable, "-m", "fmabs_core", "methods", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
