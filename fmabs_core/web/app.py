"""The trame server of ``fmabs web``: trame-slicer's scene and views, the panels, routes and the polling loop.

Why a polling loop: jobs run in their own processes and write their run folders (as for the Slicer
module's timer); once a second the loop reads them through ``FMABSLogic`` and pushes what changed to
the page. Every button handler turns bad input into one line in the page, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fmabs_core.data import io as fio
from fmabs_core.errors import FmabsError, InputError
from fmabs_core.web import security
from fmabs_core.web.session import UPLOADS_DIR, WebSession

log = logging.getLogger(__name__)

LAYOUT_ID = "FM-ABS"
POLL_S = 1.0


@dataclass
class WebOptions:
    project: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_upload_mb: int = security.DEFAULT_MAX_UPLOAD_MB


class WebApp:
    """One server: one scene, one project, one page model shared by the sessions that hold the token."""

    def __init__(self, options: WebOptions, server: Any = None):
        from trame.app import get_server
        from trame_slicer.app.logic.segmentation import SegmentEditorLogic
        from trame_slicer.app.ui.segmentation import SegmentEditorUI
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        from fmabs_core.web import ui

        self.options = options
        self.server = server or get_server("fmabs_web", client_type="vue3")
        self.state = self.server.state
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        views = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                 ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()]
        self.layout_manager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, [
            Layout(LayoutDirection.Vertical, [views[0], views[1]]),
            Layout(LayoutDirection.Vertical, [views[2], views[3]])]))
        self.layout_manager.set_layout(LAYOUT_ID)
        # after the views: effect parameter nodes added before a view exists get pipelines without a view
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer)
        flat_brushes(self.editor_logic)
        self.session = WebSession(self.slicer, options.project)
        # the method list comes from a child process (it imports torch): ask now, not on the first Start
        threading.Thread(target=self.session.lib.jobs.available_methods, daemon=True).start()
        jobs = self.session.lib.jobs
        choices = {"methods": jobs.METHODS, "generalists": jobs.GENERALISTS, "strategies": jobs.STRATEGIES,
                   "experts": jobs.EXPERTS, "devices": jobs.DEVICES}
        self._init_state()

        def editor_ui() -> Any:
            editor = SegmentEditorUI()
            self.editor_logic.set_ui(editor)
            return editor

        self.layout = ui.build(self.server, self.layout_manager, self.actions(), editor_ui, choices)
        self.slicer.segmentation_editor.segmentation_modified.connect(self._on_edit)
        self.state.change("review_opacity", *(f"layer_{layer}" for layer in ui.REVIEW_LAYERS))(
            self._guard(self.update_review))
        self.server.controller.on_server_bind.add(self._bind_routes)
        self.server.controller.on_server_ready.add(lambda **_: asyncio.ensure_future(self._poll_loop()))

    # ---- state -------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "FM-ABS"
        s.update({"message": "", "message_kind": "info", "label_status": "", "label_warnings": [], "label_edits": 0,
                  "suggestions": [], "train_progress": 0, "train_line": "not started", "train_state": "not started",
                  "train_iteration": 0, "train_eta": "-", "train_dice": "-", "train_losses": "-", "train_plot": "",
                  "train_rounds": [], "train_rounds_warning": "", "train_log": "", "review_layers": [],
                  "review_status": "", "segment_status": "",
                  "upload_status": "", "exported": False, "exported_nifti": "", "exported_nrrd": "",
                  "max_upload_mb": self.options.max_upload_mb, "segment_choices": [], "label_case": "",
                  "review_case": "", "review_run": "", "model_run": "", "segment_scan": ""})
        self.refresh_project()
        classes = self.session.logic.require_project().classes
        s.segment_choices = [{"title": f"{k}: {v}", "value": i} for i, (k, v) in enumerate(sorted(classes.items()))]
        s.segment_index = 0

    def refresh_project(self) -> None:
        summary = self.session.project_summary()
        self.state.update({"cases": summary["cases"], "runs": summary["runs"], "trained_runs": summary["trained_runs"],
                           "project_info": summary["info"], "scan_choices": self.session.scan_choices()})
        s = self.state
        defaults = {"label_case": [c["value"] for c in summary["cases"]], "review_case": [c["value"] for c in summary["cases"]],
                    "review_run": summary["runs"], "model_run": summary["trained_runs"],
                    "segment_scan": [c["value"] for c in s.scan_choices]}
        for key, values in defaults.items():  # a first choice in each list, so that one click does something
            if values and s[key] not in values:
                s[key] = values[0]

    def say(self, text: str, kind: str = "info") -> None:
        self.state.message, self.state.message_kind = text, kind

    def _guard(self, action: Callable[..., Any]) -> Callable[..., Any]:
        """Run a button's action; bad input becomes one line in the page (errors: also in the log)."""
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return action(*args, **kwargs)
            except (FmabsError, ValueError, RuntimeError, OSError, KeyError) as exc:
                log.info("%s: %s", action.__name__, exc)
                self.say(" ".join(str(exc).split()), "error")
            except Exception as exc:  # noqa: BLE001 - a bug: one line in the page, the traceback in the log
                log.exception("internal error in %s", action.__name__)
                self.say(f"internal error ({type(exc).__name__}: {exc}); the traceback is in the server's log", "error")
            return None
        run.__name__ = action.__name__
        return run

    def actions(self) -> dict[str, Callable[..., Any]]:
        names = ["open_project", "import_folder", "load_case", "ask_suggestions", "choose_suggestion", "show_slices",
                 "draw", "save_crosslabel", "start_training", "watch_run", "cancel_training", "load_review",
                 "start_segmentation", "cancel_segmentation", "export"]
        return {n: self._guard(getattr(self, n)) for n in names}

    # ---- Project and Label ---------------------------------------------------------------------------
    def open_project(self) -> None:
        self.say(self.session.open_project())
        self.refresh_project()

    def import_folder(self) -> None:
        self.say(self.session.import_folder(self.state.import_folder or ""))
        self.refresh_project()

    def load_case(self) -> None:
        self.session.load_case(self.state.label_case or "")
        self.state.label_warnings = []
        self.slices_status()
        if self.session.logic.drawing_is_saved_crosslabel():  # the drawn planes are shown: say so beside them
            self.state.label_status += ": the saved cross-label (tick Replace to save changes)"

    def slices_status(self) -> None:
        shown = self.session.show_slices()
        self.state.label_status = "Showing " + ", ".join(f"{v} {i}" for v, i in shown.items())

    def show_slices(self) -> None:
        self.slices_status()

    def ask_suggestions(self) -> None:
        text = self.session.ask_suggestions((self.state.run or "").strip(), self.state.strategy)
        if text is None:
            self.state.suggestions = self.session.set_suggestions(self.session.suggestions)
            self.state.label_status = f"{len(self.session.suggestions)} suggestions."
        else:
            self.state.label_status = text

    def choose_suggestion(self, case: str | None) -> None:
        if case:
            self.state.label_case = case

    def _on_edit(self, *_: Any) -> None:
        """Count the segment editor's edits (a stroke lands once the server has processed it)."""
        with self.state:
            self.state.label_edits = int(self.state.label_edits or 0) + 1

    def draw(self) -> None:
        self.session.draw(int(self.state.segment_index or 0))
        self.state.label_edits = 0
        self.state.label_status = "Paint on the three slices shown, then Save cross-label."

    def save_crosslabel(self) -> None:
        text, warnings = self.session.save_crosslabel(bool(self.state.label_replace))
        self.state.label_replace = False
        self.state.label_status, self.state.label_warnings = text, warnings
        self.refresh_project()

    # ---- Train -------------------------------------------------------------------------------------
    def start_training(self) -> None:
        s = self.state
        choices = {"run": (s.run or "").strip(), "method": (s.method or "").strip(), "iterations": int(s.iterations),
                   "device": s.device, "generalist": s.generalist, "active": s.strategy, "budget": int(s.budget or 0),
                   "expert": s.expert}
        self.session.start_training(choices, s.train_options or "")
        s.train_log, s.train_line, s.train_progress = "", "starting", 0
        s.train_rounds, s.train_rounds_warning = [], ""
        self.say(f"Started training run '{choices['run']}'.")

    def watch_run(self) -> None:
        self.session.watch_run((self.state.run or "").strip())
        self.state.train_log, self.state.train_rounds, self.state.train_rounds_warning = "", [], ""

    def cancel_training(self) -> None:
        self.state.train_line = self.session.cancel_training()

    def poll_training(self) -> None:
        view = self.session.poll_training()
        if view is None:
            return
        s = self.state
        s.train_state, s.train_line, s.train_progress = view["state"], view["line"], view["progress"]
        s.train_iteration, s.train_eta, s.train_dice = view["iteration"], view["eta"], view["dice"]
        s.train_losses, s.train_plot = view["losses"], view["plot"]
        if s.train_rounds != view["rounds"] or s.train_rounds_warning != view["rounds_warning"]:
            s.train_rounds, s.train_rounds_warning = view["rounds"], view["rounds_warning"]
        if view["lines"]:
            s.train_log = "\n".join(((s.train_log or "").splitlines() + view["lines"])[-200:])
        if view["suggestions"] is not None:
            s.suggestions = view["suggestions"]
        if view["finished"] and s.trained_runs != self.session.logic.trained_runs():
            self.refresh_project()

    # ---- Review ------------------------------------------------------------------------------------
    def load_review(self) -> None:
        layers = self.session.load_review((self.state.review_case or ""), (self.state.review_run or ""))
        self.state.review_layers = layers
        self.state.review_status = (f"Layers: {', '.join(layers)}" if layers else
                                    f"Run '{self.state.review_run}' has no pseudo-labels or prediction for this scan yet.")
        self.update_review()

    def update_review(self, **_: Any) -> None:
        from fmabs_core.web.ui import REVIEW_LAYERS

        visible = {layer: bool(self.state[f"layer_{layer}"]) for layer in REVIEW_LAYERS}
        self.session.set_review_visibility(visible, float(self.state.review_opacity))

    # ---- Segment and export ------------------------------------------------------------------------
    def start_segmentation(self) -> None:
        self.state.exported = False
        self.state.segment_status = self.session.start_segmentation(self.state.model_run, self.state.segment_scan,
                                                                    self.state.device)

    def cancel_segmentation(self) -> None:
        self.session.logic.cancel_prediction()

    def poll_segmentation(self) -> None:
        try:
            text = self.session.poll_segmentation()
        except RuntimeError as exc:
            self.state.segment_status = str(exc).splitlines()[0]
            return
        if text is not None:
            self.state.segment_status = text

    def export(self) -> None:
        files = self.session.export(self.state.export_name or "")
        self.state.update({"exported": True, "exported_nifti": files["nifti"].name, "exported_nrrd": files["nrrd"].name})
        self.say(f"Exported {files['nifti'].name} and {files['nrrd'].name} to {files['nifti'].parent}.")

    def on_uploaded(self, text: str) -> None:
        self.state.upload_status = text
        self.state.scan_choices = self.session.scan_choices()
        if text.startswith("Uploaded "):
            self.state.segment_scan = f"upload:{text.split()[1]}"

    # ---- loop and routes ---------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            with self.state:
                for poll in (self.poll_training, self.poll_segmentation, self._poll_suggestions):
                    self._guard(poll)()

    def _poll_suggestions(self) -> None:
        if self.session.logic.suggest_job is None:
            return
        found = self.session.logic.finish_suggestions()
        if found is not None:
            self.state.suggestions = self.session.set_suggestions(found)
            self.state.label_status = f"{len(found)} suggestions."

    def _bind_routes(self, wslink_server: Any) -> None:
        app = wslink_server.app
        app.middlewares.append(token_middleware(self.options.token))
        app.router.add_post("/fmabs/upload", self._upload)
        app.router.add_get("/fmabs/download/{kind}", self._download)

    async def _download(self, request: Any) -> Any:
        from aiohttp import web

        path = self.session.exported.get(request.match_info["kind"])
        if path is None or not path.is_file():
            raise web.HTTPNotFound(text="nothing exported yet: Segment and export, then Export")
        path = security.confine(self.session.root, str(path), "download")
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{path.name}"'})

    async def _upload(self, request: Any) -> Any:
        """Store a scan under ``uploads/`` after the checks every input gets; size-limited while it streams.

        The page posts a plain form into a hidden frame; the outcome goes into the page's state.
        """
        from aiohttp import web

        status, text = await self._receive_upload(request)
        with self.state:
            self.on_uploaded(text)
        return web.Response(status=status, text=text)

    async def _receive_upload(self, request: Any) -> tuple[int, str]:
        limit = self.options.max_upload_mb * 1024 * 1024
        too_big = f"larger than {self.options.max_upload_mb} MB (fmabs web --max-upload-mb)"
        if request.content_length is not None and request.content_length > limit + 65536:
            return 413, f"upload: {too_big}"
        try:
            reader = await request.multipart()
            part = await reader.next()
        except (ValueError, AssertionError, KeyError):
            return 400, "upload: send the scan as a form file field"
        if part is None or not getattr(part, "filename", None):
            return 400, "upload: choose a NIfTI file (.nii or .nii.gz)"
        try:
            name = security.upload_name(part.filename)
        except InputError as exc:
            return 400, str(exc)
        folder = self.session.root / UPLOADS_DIR
        folder.mkdir(exist_ok=True)
        target = folder / f"{name}.nii.gz"
        suffix = ".nii.gz" if part.filename.lower().endswith(".gz") else ".nii"
        received = folder / f".{name}.part{suffix}"
        size = 0
        try:
            with open(received, "wb") as fh:
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        return 413, f"upload {part.filename}: {too_big}"
                    fh.write(chunk)
            volume = await asyncio.to_thread(fio.load_image, received)  # header and voxels checked
            await asyncio.to_thread(_save_as_nifti_gz, received, target)
        except InputError as exc:
            return 400, str(exc).replace(str(received), part.filename)
        finally:
            received.unlink(missing_ok=True)
        log.info("uploaded %s (%d bytes, shape %s)", target, size, volume.array.shape)
        return 200, f"Uploaded {target.name} ({size // 1024} KiB)."


def flat_brushes(editor_logic: Any) -> None:
    """Paint and Erase start with a flat (one-slice) brush: a cross-label is three single planes.

    trame-slicer's brushes default to a sphere, which would also paint the neighbouring slices (the
    Slicer panel's warning tells users to turn it off there too). The toggle stays in the editor.
    """
    from trame_slicer.app.logic.segmentation.brush_effect_logic import BrushEffectLogic

    for logic in getattr(editor_logic, "_effect_logic", []):
        if isinstance(logic, BrushEffectLogic):
            logic._brush_state.data.use_sphere_brush = False  # noqa: SLF001 - no public setter for the UI state
            logic.effect.set_use_sphere_brush(False)


def _save_as_nifti_gz(source: Path, target: Path) -> None:
    import nibabel as nib

    img = nib.load(str(source))
    with fio.atomic_path(target) as tmp:
        nib.save(img, str(tmp))


def token_middleware(token: str | None) -> Callable[..., Any]:
    """aiohttp middleware: every request (page, files, websocket) shows the token, in the URL once then a cookie."""
    from aiohttp import web

    @web.middleware
    async def check(request: Any, handler: Callable[..., Any]) -> Any:
        if token is None:
            return await handler(request)
        offered = request.query.get("token")
        if security.token_matches(token, offered):
            response = await handler(request)
            response.set_cookie(security.TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        if security.token_matches(token, request.cookies.get(security.TOKEN_COOKIE)):
            return await handler(request)
        return web.Response(status=401, text="fmabs web: this server needs its access token: open the URL "
                                             "printed when it started (.../?token=...)")
    return check


def serve(options: WebOptions, ready: Callable[[str], None] | None = None) -> None:
    """Build the app and serve until interrupted (the trame event loop runs here)."""
    token = options.token
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        # a headless server: VTK would try X first, warn, then fall back to EGL anyway
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    for noisy in ("trame_server", "trame_client", "trame_slicer", "aiohttp.access", "wslink"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = WebApp(options)
    shown = socket.gethostname() if options.host in ("0.0.0.0", "::", "") else options.host
    url = f"http://{shown}:{options.port}/" + (f"?token={token}" if token else "")
    print(f"fmabs web: serving {options.project} at {url}", flush=True)
    if not security.is_loopback(options.host):
        print(f"fmabs web: listening on {options.host}, not only this machine: every session needs the token in "
              "that URL. An SSH tunnel is safer: ssh -L PORT:127.0.0.1:PORT this-machine, and serve on loopback.",
              flush=True)
    if ready is not None:
        ready(url)
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame parses sys.argv for its own options: give it none
    try:
        app.server.start(host=options.host, port=options.port, open_browser=False, show_connection_info=False,
                         timeout=0)
    finally:
        sys.argv = argv


