"""``fmabs web``: serve the panels in a browser (needs the ``web`` extra; imported only when run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fmabs_core.contract import PROJECT_FILE
from fmabs_core.errors import FmabsError, InputError


def cmd_web(args: argparse.Namespace) -> int:
    project = Path(args.project)
    if not (project / PROJECT_FILE).is_file():
        raise InputError(f"--project {project}: not an FM-ABS project (no {PROJECT_FILE}); create one with "
                         "fmabs import, or fmabs demo")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: give a port between 1 and 65535")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb {args.max_upload_mb}: give a positive size in MB")
    from fmabs_core.web.security import access_token, check_listen  # standard library only

    token = access_token(args.host, args.token)
    check_listen(args.host, args.port)
    try:
        from fmabs_core.web.app import WebOptions, serve
    except ImportError as exc:
        raise FmabsError(f"fmabs web needs the web extra ({exc.name} is missing): pip install -e \".[web]\"") from None
    serve(WebOptions(project=project.resolve(), host=args.host, port=args.port, token=token,
                     max_upload_mb=args.max_upload_mb))
    return 0


def register(sub: argparse._SubParsersAction, light: bool = False) -> None:
    p = sub.add_parser("web", help="the Project, Label, Train, Review and Segment panels in a browser (trame-slicer)",
                       description="Serve the SlicerFMABS panels in a browser. It listens on loopback unless --host "
                                   "says otherwise; any other host needs a token (generated and printed, or "
                                   "--token / FMABS_WEB_TOKEN). From a laptop, prefer an SSH tunnel: "
                                   "ssh -L 8080:127.0.0.1:8080 gpu-machine.")
    p.add_argument("--project", required=True, help="the project folder the page works on (paths stay inside it)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", help="access token every session must show (at least 16 characters); default: "
                                   "$FMABS_WEB_TOKEN, else generated for a non-loopback --host")
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest scan the page accepts for upload")
    p.set_defaults(func=cmd_web)
