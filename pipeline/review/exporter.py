"""The export: chosen labels rows -> a review package in one tool's format (docs/review.md).

The package is written in a local scratch folder as the label maps stream by, then copied to `--to` (local or
S3) with export.json last, so a package with its export.json is whole.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from ..errors import JobError
from ..label.run_record import read_run_records
from ..storage import Location
from .coco import INSTANCES, CocoWriter
from .cvat import ZIP_NAME, CvatWriter
from .label_studio import CONFIG, TASKS, LabelStudioWriter
from .package import FORMATS, PROVENANCE, Provenance
from .select import Selection, SelectionError, choose, read_chosen, relative_names


@dataclass(frozen=True)
class ExportConfig:
    output: str
    to: str
    format: str
    selection: Selection
    overwrite: bool = False

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise JobError(f"--format {self.format!r}: use one of {', '.join(FORMATS)}")


def _class_names(output: Location, run_ids: set[str]) -> list[str]:
    """The chosen runs' class names (their run records'); one list, or an error naming the runs that differ."""
    found: dict[str, list[str]] = {}
    for record in read_run_records(output):
        if record.get("run_id") in run_ids and record.get("class_names"):
            found[record["run_id"]] = list(record["class_names"])
    missing = sorted(run_ids - set(found))
    if missing:
        raise JobError(f"run record(s) of {', '.join(missing[:3])} name no class names (runs/<run_id>.json, written "
                       "before issue 32's quality step): the package could not name the classes")
    distinct = {tuple(v) for v in found.values()}
    if len(distinct) > 1:
        raise JobError(f"the chosen rows come from runs whose models name different classes ({len(distinct)} sets): "
                       "export each model's rows apart (--where \"model_id = '...'\")")
    return list(distinct.pop())


def _writer(fmt: str, work: str, class_names: list[str], info: dict):
    if fmt == "cvat":
        return CvatWriter(os.path.join(work, ZIP_NAME), class_names)
    if fmt == "label-studio":
        return LabelStudioWriter(os.path.join(work, TASKS), os.path.join(work, CONFIG), class_names)
    return CocoWriter(os.path.join(work, INSTANCES), class_names, info)


def export_review(cfg: ExportConfig) -> dict:
    """Write the package; returns the summary (where, how many, which runs and model, how to import it back)."""
    cfg.validate()
    output = Location.of(cfg.output)
    output.check_exists("labeling output")
    to = Location.writable(cfg.to)
    if to.child(PROVENANCE).exists() and not cfg.overwrite:
        raise JobError(f"{to.uri} already holds a review package ({PROVENANCE}): choose another --to, or --overwrite")
    if cfg.overwrite:  # export.json first (a package without it is visibly incomplete), then every format's files
        for name in (PROVENANCE, ZIP_NAME, TASKS, CONFIG, INSTANCES):
            if to.child(name).exists():
                to.child(name).remove()
    rows = choose(output, cfg.selection)
    if not rows:
        raise SelectionError(f"the selection ({cfg.selection.describe()}) matches no labels row under {output.uri}")
    class_names = _class_names(output, {r["run_id"] for r in rows})
    names = relative_names([r["image_uri"] for r in rows])
    provenance = Provenance(output.uri, cfg.format, class_names, cfg.selection.describe())
    work = tempfile.mkdtemp(prefix="review-export-")
    try:
        writer = _writer(cfg.format, work, class_names, {"description": f"FCN labels from {output.uri}",
                                                          "fcn_output": output.uri,
                                                          "fcn_selection": cfg.selection.describe()})
        for chosen in read_chosen(output, rows):
            name = names[chosen.image_uri]
            writer.add(name, chosen.label, image_uri=chosen.image_uri, model_id=chosen.model_id,
                       run_id=chosen.run_id, score=chosen.mean_confidence)
            provenance.images.append({"name": name, "image_uri": chosen.image_uri, "run_id": chosen.run_id,
                                      "model_id": chosen.model_id, "run_date": chosen.run_date,
                                      "width": chosen.width, "height": chosen.height,
                                      "mean_confidence": chosen.mean_confidence})
        files = writer.close()
        for path in files:  # in pieces: a 10,000-image tasks.json is hundreds of MB
            with open(path, "rb") as src, to.child(os.path.basename(path)).open_write() as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        to.child(PROVENANCE).write_text(provenance.to_json())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    main = {"cvat": ZIP_NAME, "label-studio": TASKS, "coco": INSTANCES}[cfg.format]
    return {"package": to.uri, "format": cfg.format, "images": len(provenance.images),
            "files": [to.child(os.path.basename(p)).uri for p in files] + [to.child(PROVENANCE).uri],
            "runs": sorted({i["run_id"] for i in provenance.images}),
            "model_ids": sorted({i["model_id"] for i in provenance.images}), "classes": len(class_names),
            "selection": cfg.selection.describe(),
            "import_with": f"python jobs/import_review.py --from <the tool's export of {to.child(main).uri}> "
                           f"--format {cfg.format} --classes <checkpoint> --images-from {to.uri} --to <dataset>"}
