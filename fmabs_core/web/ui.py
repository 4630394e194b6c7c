"""The page: five panels (tabs) in a drawer, three slice views and a 3D view beside them.

Only layout here: every button calls a function of :mod:`.app` (``actions``), which calls
:class:`.session.WebSession`. Element ids (``btn-load``, ``train-state``...) are stable: the
end-to-end test and users' own scripts find the controls by them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3

PANELS = (("project", "Project"), ("label", "Label"), ("train", "Train"), ("review", "Review"),
          ("segment", "Segment and export"))
REVIEW_LAYERS = ("axial", "coronal", "sagittal", "fused", "prediction")


def _button(text: str, ident: str, action: Callable[..., Any], **kwargs: Any) -> v3.VBtn:
    return v3.VBtn(text, id=ident, click=action, size="small", classes="ma-1", variant="tonal", **kwargs)


def build(server: Any, layout_manager: Any, actions: Mapping[str, Callable[..., Any]],
          editor_ui_factory: Callable[[], Any], choices: Mapping[str, Any]) -> SinglePageWithDrawerLayout:
    """Build the page; returns the layout (its ``content`` holds the view grid)."""
    a = actions
    with SinglePageWithDrawerLayout(server, width=430) as layout:
        layout.title.set_text("FM-ABS")
        with layout.toolbar:
            v3.VSpacer()
            html.Div("{{ project_info }}", id="project-info", classes="text-caption mr-4")
        with layout.drawer:
            v3.VAlert(v_if=("message",), text=("message",), type=("message_kind",), density="compact",
                      closable=True, id="message", classes="ma-2", click_close="message = ''")
            with v3.VTabs(v_model=("panel", "project"), density="compact", show_arrows=True):
                for key, title in PANELS:
                    v3.VTab(title, value=key, id=f"tab-{key}")
            with v3.VWindow(v_model=("panel",), classes="pa-2"):
                with v3.VWindowItem(value="project"):
                    _project(a)
                with v3.VWindowItem(value="label"):
                    _label(a, editor_ui_factory)
                with v3.VWindowItem(value="train"):
                    _train(a, choices)
                with v3.VWindowItem(value="review"):
                    _review(a)
                with v3.VWindowItem(value="segment"):
                    _segment(a, choices)
        with layout.content:
            with html.Div(style="position: relative; width: 100%; height: calc(100vh - 90px);", id="views"):
                layout_manager.initialize_layout_grid(layout)
    return layout


def _project(a: Mapping[str, Callable[..., Any]]) -> None:
    _button("Open project", "btn-open", a["open_project"])
    html.Div("{{ project_info }}", classes="text-body-2 my-2", id="project-summary")
    with v3.VList(density="compact", id="case-list", max_height=240, classes="overflow-y-auto"):
        v3.VListItem(v_for="c in cases", key="c.value", title=("c.title",))
    v3.VTextField(v_model=("import_folder", ""), label="Import a folder inside the project (imagesTr/labelsTr or scans)",
                  density="compact", id="import-folder")
    _button("Import folder", "btn-import", a["import_folder"])


def _label(a: Mapping[str, Callable[..., Any]], editor_ui_factory: Callable[[], Any]) -> None:
    v3.VSelect(v_model=("label_case", ""), items=("cases",), label="Scan", density="compact", id="label-case")
    _button("Load", "btn-load", a["load_case"])
    _button("Ask model", "btn-suggest", a["ask_suggestions"])
    v3.VSelect(v_model=("suggestion", None), items=("suggestions", []), label="Suggested scans and slices",
               density="compact", id="label-suggestions", update_modelValue=(a["choose_suggestion"], "[$event]"))
    _button("Show slices", "btn-show-slices", a["show_slices"])
    v3.VSelect(v_model=("segment_index", 0), items=("segment_choices", []), label="Class to draw",
               density="compact", id="label-class")
    _button("Draw", "btn-draw", a["draw"])
    v3.VCheckbox(v_model=("label_replace", False), label="Replace an existing cross-label", density="compact",
                 hide_details=True, id="label-replace")
    _button("Save cross-label", "btn-save", a["save_crosslabel"], color="primary")
    html.Div("{{ label_status }}", id="label-status", classes="text-body-2 my-1")
    html.Div("Edits since Draw: {{ label_edits }}", id="label-edits", classes="text-caption")
    v3.VAlert(v_if=("label_warnings.length",), type="warning", density="compact", id="label-warnings",
              title="Cross-label saved, please check", text=("label_warnings.join(' ')",))
    with v3.VExpansionPanels(classes="mt-2"):
        with v3.VExpansionPanel(title="Segment editor (paint, erase, scissors, islands, undo)"):
            with v3.VExpansionPanelText():
                editor_ui_factory()


def _train(a: Mapping[str, Callable[..., Any]], choices: Mapping[str, Any]) -> None:
    with v3.VRow(dense=True):
        with v3.VCol(cols=6):
            v3.VTextField(v_model=("run", "run1"), label="Run name", density="compact", id="train-run")
        with v3.VCol(cols=6):
            v3.VCombobox(v_model=("method", "fmabs"), items=("methods", list(choices["methods"])), label="Method",
                         density="compact", id="train-method")
        with v3.VCol(cols=6):
            v3.VSelect(v_model=("generalist", "litemedsam"), items=("generalists", list(choices["generalists"])),
                       label="Generalist", density="compact")
        with v3.VCol(cols=6):
            v3.VSelect(v_model=("strategy", "none"), items=("strategies", list(choices["strategies"])),
                       label="Next-scan strategy", density="compact")
        with v3.VCol(cols=4):
            v3.VSelect(v_model=("expert", "human"), items=("experts", list(choices["experts"])), label="Expert",
                       density="compact")
        with v3.VCol(cols=4):
            v3.VTextField(v_model=("budget", 10), label="Budget", type="number", density="compact")
        with v3.VCol(cols=4):
            v3.VTextField(v_model=("iterations", 6000), label="Iterations", type="number", density="compact",
                          id="train-iterations")
        with v3.VCol(cols=4):
            v3.VSelect(v_model=("device", "auto"), items=("devices", list(choices["devices"])), label="Device",
                       density="compact")
        with v3.VCol(cols=8):
            v3.VTextField(v_model=("train_options", ""), label="More options (e.g. --patch-size 64 64 64)",
                          density="compact", id="train-options")
    _button("Start", "btn-train-start", a["start_training"], color="primary")
    _button("Watch run", "btn-train-watch", a["watch_run"])
    _button("Cancel", "btn-train-cancel", a["cancel_training"], color="error")
    v3.VProgressLinear(model_value=("train_progress", 0), height=14, classes="my-2", id="train-progress")
    html.Div("{{ train_line }}", id="train-state", classes="text-body-2")
    html.Div("iteration {{ train_iteration }}", id="train-iteration", classes="text-caption")
    html.Div("ETA: {{ train_eta }} | val Dice: {{ train_dice }}", id="train-eta", classes="text-body-2")
    html.Div("losses: {{ train_losses }}", id="train-losses", classes="text-caption")
    # each pseudo-label round: pseudo-labels vs teacher on the drawn slices (contract.planes_line), newest last;
    # the latest round's warning (pseudo-labels worse than the teacher there) also in a warning box
    with html.Div(v_if=("train_rounds.length",), id="train-rounds", classes="text-caption my-1"):
        html.Div("{{ line }}", v_for="(line, i) in train_rounds", key="i")
    v3.VAlert(v_if=("train_rounds_warning",), type="warning", density="compact", id="train-rounds-warning",
              title="Latest pseudo-label round", text=("train_rounds_warning",))
    html.Div("<svg width='300' height='80' style='background:#222'><polyline fill='none' stroke='#4fc3f7' "
             "stroke-width='1.5' :points='train_plot'/></svg>", id="train-plot", classes="my-1")
    v3.VTextarea(model_value=("train_log", ""), readonly=True, rows=6, density="compact", id="train-log",
                 style="font-family: monospace; font-size: 11px")


def _review(a: Mapping[str, Callable[..., Any]]) -> None:
    v3.VSelect(v_model=("review_run", ""), items=("runs", []), label="Run", density="compact", id="review-run")
    v3.VSelect(v_model=("review_case", ""), items=("cases",), label="Scan", density="compact", id="review-case")
    _button("Load layers", "btn-review", a["load_review"])
    html.Div("{{ review_status }}", id="review-status", classes="text-body-2")
    for layer in REVIEW_LAYERS:
        v3.VCheckbox(v_model=(f"layer_{layer}", True), label=layer, density="compact", hide_details=True,
                     id=f"layer-{layer}", disabled=(f"!review_layers.includes('{layer}')",))
    v3.VSlider(v_model=("review_opacity", 0.5), min=0, max=1, step=0.05, label="Opacity", density="compact")


def _segment(a: Mapping[str, Callable[..., Any]], choices: Mapping[str, Any]) -> None:
    v3.VSelect(v_model=("model_run", ""), items=("trained_runs", []), label="Trained model (run)", density="compact",
               id="segment-model")
    v3.VSelect(v_model=("segment_scan", ""), items=("scan_choices", []), label="Scan", density="compact",
               id="segment-scan")
    html.Div("Or upload a scan (NIfTI, up to {{ max_upload_mb }} MB):", classes="text-caption")
    # a plain form posted into a hidden frame: no script; the server puts the outcome in the page
    with html.Form(action="fmabs/upload", method="post", enctype="multipart/form-data", target="fmabs-upload-sink"):
        html.Input(type="file", name="scan", accept=".nii,.gz", id="upload-input", classes="my-1",
                   change="upload_status = 'Uploading...'; $event.target.form.requestSubmit()")
    html.Iframe(name="fmabs-upload-sink", style="display: none")
    html.Div("{{ upload_status }}", id="upload-status", classes="text-caption")
    _button("Segment", "btn-segment", a["start_segmentation"], color="primary")
    _button("Cancel", "btn-segment-cancel", a["cancel_segmentation"])
    html.Div("{{ segment_status }}", id="segment-status", classes="text-body-2")
    v3.VTextField(v_model=("export_name", ""), label="Export name (default: <scan>_segmentation)", density="compact",
                  id="export-name")
    _button("Export", "btn-export", a["export"])
    with html.Div(v_if=("exported",), id="downloads"):
        html.A("Download NIfTI", href="fmabs/download/nifti", id="dl-nifti", download=("exported_nifti",),
               classes="mr-4")
        html.A("Download .seg.nrrd", href="fmabs/download/nrrd", id="dl-nrrd", download=("exported_nrrd",))
