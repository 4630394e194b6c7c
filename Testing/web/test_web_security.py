"""Who may use ``fmabs web`` and which files the page may name: loopback, tokens, paths, uploads, options."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fmabs_core.errors import InputError
from fmabs_core.web import security
from fmabs_core.web.session import parse_train_options


def test_loopback_needs_no_token_other_hosts_get_one():
    assert security.is_loopback("127.0.0.1") and security.is_loopback("::1") and security.is_loopback("localhost")
    assert not security.is_loopback("0.0.0.0") and not security.is_loopback("192.168.1.20")
    assert security.access_token("127.0.0.1", None) is None
    generated = security.access_token("0.0.0.0", None)
    assert generated and len(generated) >= 24 and generated != security.access_token("0.0.0.0", None)
    given = "a-long-enough-token-1234"
    assert security.access_token("127.0.0.1", given) == given  # a given token is required on loopback too
    with pytest.raises(InputError, match="--token"):
        security.access_token("0.0.0.0", "short")
    assert security.token_matches(given, given) and not security.token_matches(given, None)
    assert not security.token_matches(given, given + "x") and security.token_matches(None, None)


def test_paths_are_confined_to_the_project(tmp_path):
    root = tmp_path / "project"
    (root / "incoming").mkdir(parents=True)
    assert security.confine(root, "incoming") == (root / "incoming").resolve()
    assert security.confine(root, str(root / "incoming")) == (root / "incoming").resolve()
    (root / "escape").symlink_to(tmp_path)
    for bad in ("/etc", "../", "incoming/../../x", "escape", "~", ""):
        with pytest.raises(InputError):
            security.confine(root, bad, "import folder")


def test_upload_names_become_safe_case_names():
    assert security.upload_name("C:\\scans\\patient 01.nii.gz") == "patient_01"
    assert security.upload_name("../../etc/x.nii") == "x"
    assert security.upload_name(".nii.gz") == "scan"
    for bad in ("notes.txt", "scan.nrrd", "x.nii.gz.exe"):
        with pytest.raises(InputError, match="not a NIfTI"):
            security.upload_name(bad)


def test_train_options_refuse_paths_and_panel_options():
    assert parse_train_options("--patch-size 32 32 32 --width 4") == ["--patch-size", "32", "32", "32", "--width", "4"]
    for bad in ("--project /tmp/x", "--generalist-checkpoint w.pt", "--width ../4", "--run other", "--lr '1"):
        with pytest.raises(InputError, match="more options"):
            parse_train_options(bad)


@pytest.mark.slow
def test_non_loopback_bind_needs_the_token(phantom_project, server_factory):
    """Bound to every interface without --token: a token is generated, printed, and every request needs it."""
    from web_helpers import need_web

    need_web()
    server = server_factory(phantom_project, "--max-upload-mb", "1", host="0.0.0.0")
    url = server.url_line()
    assert "?token=" in url
    token = url.split("?token=", 1)[1]
    base = f"http://127.0.0.1:{server.port}"
    for path in ("/", "/index.html", "/ws", "/fmabs/download/nifti"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        assert refused.value.code == 401, path
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/?token={token}x", timeout=10)
    assert refused.value.code == 401
    answer = urllib.request.urlopen(f"{base}/index.html?token={token}", timeout=10)
    assert answer.status == 200 and "fmabs_token=" in answer.headers.get("Set-Cookie", "")
    request = urllib.request.Request(f"{base}/index.html", headers={"Cookie": f"fmabs_token={token}"})
    assert urllib.request.urlopen(request, timeout=10).status == 200

    # uploads: size-limited while streaming, checked like any input, stored under uploads/ only
    def upload(filename: str, content: bytes) -> tuple[int, str]:
        boundary = "fmabs-test-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        post = urllib.request.Request(f"{base}/fmabs/upload", data=body, method="POST", headers={
            "Cookie": f"fmabs_token={token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            answer = urllib.request.urlopen(post, timeout=30)
            return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    status, text = upload("big.nii.gz", b"\0" * (2 * 1024 * 1024))
    assert status == 413 and "larger than 1 MB" in text
    status, text = upload("../../../outside.nii.gz", b"not a nifti at all")
    assert status == 400 and "outside" in text and "Traceback" not in text
    assert not (phantom_project.parent / "outside.nii.gz").exists()
    assert list((phantom_project / "uploads").iterdir()) == []  # nothing half-written is left


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from fmabs_core.cli import main

    assert main(["web", "--project", str(tmp_path)]) == 2
    assert "not an FM-ABS project" in capsys.readouterr().err
    Path(tmp_path / "fmabs.json").write_text("{}")
    assert main(["web", "--project", str(tmp_path), "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
    assert main(["web", "--project", str(tmp_path), "--token", "short"]) == 2
    assert "--token" in capsys.readouterr().err
    # the token from the environment is named as such, not as --token
    monkeypatch.setenv(security.TOKEN_ENV, "short")
    assert main(["web", "--project", str(tmp_path)]) == 2
    assert "FMABS_WEB_TOKEN" in capsys.readouterr().err


def test_a_busy_port_or_an_unknown_host_is_refused_before_serving(tmp_path, capsys):
    """Before: "serving ... at http://..." was printed, then a traceback (the port in use, the host unknown)."""
    import socket

    from fmabs_core.cli import main

    Path(tmp_path / "fmabs.json").write_text("{}")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert main(["web", "--project", str(tmp_path), "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert f"--port {port}" in err and "serving" not in out
    finally:
        busy.close()
    assert main(["web", "--project", str(tmp_path), "--host", "no-such-host.invalid"]) == 2
    out, err = capsys.readouterr()
    assert "--host no-such-host.invalid" in err and "serving" not in out
