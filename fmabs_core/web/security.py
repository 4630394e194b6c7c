"""Who may use the web app, and which files the browser may name.

Why: the app runs jobs and reads and writes files as the user who started it. On loopback only
that machine's users can reach it; on any other interface a token is required on every session
(the page URL carries it once, then an HttpOnly cookie). Every path that comes from the browser
is resolved inside the project folder and refused otherwise; uploads are size-limited and
checked like every other input before anything uses them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import socket
from pathlib import Path

from fmabs_core.errors import InputError

log = logging.getLogger(__name__)

TOKEN_COOKIE = "fmabs_token"
TOKEN_ENV = "FMABS_WEB_TOKEN"
#: default upload limit: a large CT is a few hundred MB as .nii.gz
DEFAULT_MAX_UPLOAD_MB = 1024


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them (``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_token(token: str, source: str = "--token") -> str:
    """A token given by the user (``source``: the option or variable it came from): long enough to resist
    guessing, printable, no spaces."""
    if len(token) < 16 or not token.isprintable() or any(c.isspace() for c in token):
        raise InputError(f"{source}: use at least 16 printable characters without spaces "
                         "(or leave it out and fmabs web generates one)")
    return token


def check_listen(host: str, port: int) -> None:
    """Refuse, before anything is printed or built, a host that does not resolve or a port already in use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"--host {host}: cannot be resolved to an address of this machine ({exc}); give "
                         "127.0.0.1 (the default) or this machine's name or address") from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        probe.bind(address)
    except OSError as exc:
        raise InputError(f"--port {port}: cannot listen on {host} ({exc.strerror}); another program (another "
                         "fmabs web?) may use it: choose another --port") from None
    finally:
        probe.close()


def access_token(host: str, token: str | None) -> str | None:
    """The token sessions must present: the given one, a new one for a non-loopback host, else None."""
    if token:
        return check_token(token, "--token")
    if os.environ.get(TOKEN_ENV):
        return check_token(os.environ[TOKEN_ENV], TOKEN_ENV)
    if is_loopback(host):
        return None
    return secrets.token_urlsafe(24)


def token_matches(expected: str | None, offered: str | None) -> bool:
    if expected is None:
        return True
    return offered is not None and hmac.compare_digest(expected.encode(), offered.encode())


def confine(root: str | os.PathLike, user_path: str, what: str = "path") -> Path:
    """``user_path`` (relative to ``root``, or absolute) resolved, if it lies inside ``root``; else InputError.

    Symbolic links are resolved first, so a link inside the project that points elsewhere is refused.
    """
    if not isinstance(user_path, str) or not user_path.strip() or "\x00" in user_path:
        raise InputError(f"{what}: give a path inside the project folder")
    root = Path(root).resolve()
    candidate = Path(user_path.strip()).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise InputError(f"{what} {user_path!r} is outside the project folder {root}; the web app only reads "
                         "and writes inside the project (copy the files into it first)")
    return resolved


def upload_name(filename: str) -> str:
    """The case name an uploaded file is stored under: its own name, made safe, ``.nii.gz``."""
    import re

    from fmabs_core import contract

    base = Path(str(filename).replace("\\", "/")).name
    lower = base.lower()
    if not (lower.endswith(".nii.gz") or lower.endswith(".nii")):
        raise InputError(f"upload {base!r}: not a NIfTI file (.nii or .nii.gz); convert it first (e.g. in 3D Slicer)")
    stem = base[: -len(".nii.gz")] if lower.endswith(".nii.gz") else base[: -len(".nii")]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-") or "scan"
    try:
        contract.check_name(stem[:100], "upload name")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return stem[:100]
