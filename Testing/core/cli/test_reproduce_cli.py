"""``fmabs reproduce``'s command line: listing, showing, and bad input as one line naming the option (exit 2)."""

from __future__ import annotations

import json

from fmabs_core.cli import main


def test_list_and_show(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert "la-fmabs" in out and "la-cfr" in out
    assert main(["reproduce", "la-fmabs", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "la-fmabs" and "cpu" in shown["scales"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, phantom_data):
    out = tmp_path / "out"
    cases = [
        (["reproduce", "la-fmabs", "--train", str(tmp_path / "none"), "--out", str(out)], "--train"),
        (["reproduce", "la-nothing", "--train", str(phantom_data), "--out", str(out)], "la-nothing"),
        (["reproduce", "la-fmabs", "--train", str(phantom_data), "--scale", "huge", "--out", str(out)], "--scale huge"),
        (["reproduce", "la-fmabs", "--train", str(phantom_data), "--methods", "nope", "--out", str(out)], "--methods nope"),
        (["reproduce", "la-fmabs", "--train", str(phantom_data), "--out", str(phantom_data / "inside")], "--out"),
        # 8 phantom scans: holding out the protocol's 20 test scans is impossible
        (["reproduce", "la-fmabs", "--train", str(phantom_data), "--out", str(out)], "give a --test folder"),
    ]
    # broken protocol files: deep nesting, not UTF-8, a row option its method lacks (was written, then refused)
    assert main(["reproduce", "la-fmabs", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    shown["rows"][0]["options"] = {"ema": 5}
    (tmp_path / "opt.json").write_text(json.dumps(shown))
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "latin.json").write_bytes(b"\xff\xfe{}")
    for name, word in (("opt.json", "'ema'"), ("deep.json", "nested too deeply"), ("latin.json", "not UTF-8")):
        cases.append((["reproduce", str(tmp_path / name), "--train", str(phantom_data), "--out", str(out),
                       "--methods", "sup"], word))
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert word in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (phantom_data / "inside").exists()
