"""The morning report: one self-contained HTML file a person opens to decide whether last night's labels can be
trusted. No network resources: the plots and the gallery's images are inline (data: URIs), there is no script.

It shows the night's runs (counts, errors by stage, status, the canary's scores), the class mix and the confidence
over the last N nights, the drift figures against the alert rules' thresholds, and a gallery of the night's least
confident images with their overlays and scores. Everything comes from the run records and the quality/ table
(pipeline.label.quality: one row per run), except the gallery, which reads the K chosen rows' label maps only.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..decode import decode_image
from ..errors import JobError, one_line
from ..storage import Location
from .codec import decode_label_map
from .layout import REPORTS
from .quality import read_quality
from .readers import list_table_files
from .run_record import read_run_records

# The thresholds of k8s/monitoring/prometheus-rules.yaml, drawn on the drift plots.
JS_DISTANCE_ALERT = 0.1
LOW_CONFIDENCE_RATIO_ALERT = 2.0
THUMBNAIL_SIDE = 320


class ReportError(JobError):
    """Nothing to report (no runs, no run on the night asked for): one line."""


@dataclass(frozen=True)
class Night:
    """What the report shows, gathered once."""

    output: Location
    run_date: str
    runs: list[dict]            # the night's run records
    quality: list[dict]         # quality/ rows of the window's runs, oldest night first
    errors_by_stage: dict[str, int]
    gallery: list[dict]         # the least confident images: uri, scores, overlay PNG bytes (or the problem)


def gather(output: Location, *, run_date: str | None, nights: int, gallery: int) -> Night:
    records = read_run_records(output)
    if not records:
        raise ReportError(f"{output.uri} holds no labeling runs (no runs/*.json): nothing to report")
    dates = sorted({r["run_date"] for r in records})
    night = run_date or dates[-1]
    if night not in dates:
        raise ReportError(f"no labeling run on {night} under {output.uri} (nights with runs: {', '.join(dates[-5:])})")
    window = [d for d in dates if d <= night][-nights:]
    runs = [r for r in records if r["run_date"] == night]
    return Night(output, night, runs, _quality_rows(output, window), _errors_by_stage(output, night),
                 _least_confident(output, night, gallery))


def _partition_files(output: Location, table: str, run_date: str) -> list[str]:
    return [p for p in list_table_files(output, table) if f"/run_date={run_date}/" in p]


def _quality_rows(output: Location, dates: list[str]) -> list[dict]:
    rows = [r for r in read_quality(output) if r["run_date"] in dates]
    latest: dict[str, dict] = {}  # one row per night: its latest run's
    for row in sorted(rows, key=lambda r: (r["run_date"], str(r.get("computed_at")))):
        latest[row["run_date"]] = row
    return [latest[d] for d in sorted(latest)]


def _errors_by_stage(output: Location, run_date: str) -> dict[str, int]:
    files = _partition_files(output, "errors", run_date)
    if not files:
        return {}
    stages = pads.dataset(files, format="parquet", filesystem=output.fs).to_table(columns=["stage"])["stage"]
    counts = pc.value_counts(stages).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: -c["counts"])}


def _least_confident(output: Location, run_date: str, k: int) -> list[dict]:
    """The night's k least confident labeled images (by mean_confidence; rows without it are not candidates), each
    file's k candidates first, so memory is bounded by k per file, then their overlays."""
    files = _partition_files(output, "labels", run_date)
    if not files or k <= 0:
        return []
    columns = ["image_uri", "run_id", "mean_confidence", "mean_margin", "low_confidence_fraction", "classes_present"]
    candidates = []
    for path in files:
        table = pads.dataset([path], format="parquet", filesystem=output.fs).to_table(columns=columns)
        table = table.filter(pc.is_valid(table["mean_confidence"]))
        if table.num_rows:
            best = table.take(pc.select_k_unstable(table, k, [("mean_confidence", "ascending")]))
            candidates.append(best.append_column("file", pa.array([path] * best.num_rows, pa.string())))
    if not candidates:
        return []
    chosen = pa.concat_tables(candidates).sort_by([("mean_confidence", "ascending"), ("image_uri", "ascending")])
    chosen = chosen.slice(0, k).to_pylist()
    names = _class_names(output, run_date, {row["run_id"] for row in chosen})
    out = []
    for row in chosen:
        run_names = names.get(row["run_id"], [])
        row["class_names"] = [run_names[i] if i < len(run_names) else str(i) for i in row.pop("classes_present")]
        out.append({**row, **_overlay(output, row, run_names)})
    return out


def _overlay(output: Location, row: dict, class_names: list[str]) -> dict:
    """The image blended with its labels, as a thumbnail PNG; or why it could not be drawn (the image is gone)."""
    from PIL import Image

    from .previews import render_overlay

    wanted = (pc.field("image_uri") == row["image_uri"]) & (pc.field("run_id") == row["run_id"])
    hit = pads.dataset([row.pop("file")], format="parquet", filesystem=output.fs).to_table(  # the one file it is in
        columns=["label_map", "label_encoding", "width", "height"], filter=wanted).slice(0, 1).to_pylist()
    if not hit:
        return {"overlay": None, "problem": "its labels row is gone"}
    cell = hit[0]
    try:
        rgb = decode_image(Location.of(row["image_uri"]).read_bytes())
        label = decode_label_map(cell["label_map"], cell["label_encoding"], cell["height"], cell["width"])
        png = render_overlay(rgb, label, class_names)
    except Exception as e:  # noqa: BLE001 - one image's problem: shown in its place
        return {"overlay": None, "problem": one_line(e)}
    image = Image.open(io.BytesIO(png))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE * 2))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return {"overlay": buf.getvalue(), "problem": None}


def _class_names(output: Location, run_date: str, run_ids: set[str]) -> dict[str, list[str]]:
    """run id -> class names by id, as the night's class_stats rows of those runs name them (one pass)."""
    files = _partition_files(output, "class_stats", run_date)
    if not files or not run_ids:
        return {}
    table = pads.dataset(files, format="parquet", filesystem=output.fs).to_table(
        columns=["run_id", "class_id", "class_name"], filter=pc.field("run_id").isin(sorted(run_ids)))
    found: dict[str, dict[int, str]] = {}
    for run_id, class_id, name in zip(*(table[c].to_pylist() for c in ("run_id", "class_id", "class_name")), strict=True):
        found.setdefault(run_id, {})[class_id] = name
    return {r: [names.get(i, str(i)) for i in range(max(names) + 1)] for r, names in found.items()}


# ------------------------------------------------------------------------------------------------- plots


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def plots(quality: list[dict]) -> dict[str, bytes]:
    """The class mix, the confidence and the drift over the window's nights (empty without quality/ rows)."""
    if not quality:
        return {}
    dates = [q["run_date"] for q in quality]
    x = np.arange(len(dates))
    names = sorted({n for q in quality for n in q["class_name"]})

    def class_mix(ax):
        bottom = np.zeros(len(dates))
        for name in names:
            share = np.array([dict(zip(q["class_name"], q["pixel_share"], strict=True)).get(name) or 0.0 for q in quality])
            ax.bar(x, share, bottom=bottom, label=name)
            bottom += share
        ax.set_xticks(x, dates, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("share of labeled pixels")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars: names may be long

    def confidence(ax):
        ax.plot(x, [q["mean_confidence"] for q in quality], marker="o", label="mean confidence")
        ax.plot(x, [q["low_confidence_image_share"] for q in quality], marker="s", label="low-confidence image share")
        ax.set_xticks(x, dates, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)

    def drift(ax):
        values = [np.nan if q.get("js_distance") is None else q["js_distance"] for q in quality]
        ax.plot(x, values, marker="o", label="Jensen-Shannon distance to the last 7 nights")
        ax.axhline(JS_DISTANCE_ALERT, color="red", linestyle="--", label=f"alert over {JS_DISTANCE_ALERT}")
        ax.set_xticks(x, dates, rotation=45, ha="right", fontsize=7)
        ax.legend(fontsize=7)

    return {"class mix": _figure_png(class_mix), "confidence": _figure_png(confidence), "drift": _figure_png(drift)}


# -------------------------------------------------------------------------------------------------- html


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(night: Night, figures: dict[str, bytes]) -> str:
    q = next((row for row in reversed(night.quality) if row["run_date"] == night.run_date), None)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Labels of {_e(night.run_date)}</title>",
             "<style>body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}.bad{color:#b00;font-weight:bold}"
             ".ok{color:#070}.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:330px}"
             "figcaption{font-size:12px;word-break:break-all}</style></head><body>",
             f"<h1>Labels of {_e(night.run_date)}</h1><p>Output <code>{_e(night.output.uri)}</code></p>",
             "<h2>Runs</h2><table><tr><th>run</th><th>status</th><th>listed</th><th>labeled</th><th>errors</th>"
             "<th>canary mean IU</th><th>its minimum</th></tr>"]
    for run in night.runs:
        counts, canary = run.get("counts", {}), run.get("canary") or {}
        status = run.get("status")
        css = "ok" if status == "succeeded" else "bad"
        parts.append(f"<tr><td>{_e(run['run_id'])}</td><td class='{css}'>{_e(status)}</td><td>{_e(counts.get('listed'))}</td>"
                     f"<td>{_e(counts.get('labelled'))}</td><td>{_e(counts.get('errors'))}</td>"
                     f"<td>{_num(canary.get('mean_iou'))}</td><td>{_num(canary.get('min_iou'))} "
                     f"{_e(canary.get('min_iou_source', ''))}</td></tr>")
    parts.append("</table><h2>Errors by stage</h2>")
    parts.append("<p>none</p>" if not night.errors_by_stage else "<table>" + "".join(
        f"<tr><td>{_e(s)}</td><td>{n}</td></tr>" for s, n in night.errors_by_stage.items()) + "</table>")
    parts.append("<h2>Drift against the last nights</h2>")
    if q is None:
        parts.append("<p>No quality/ row for this night (jobs/quality.py computes it).</p>")
    else:
        ratio = q.get("low_confidence_share_ratio")
        rows = [("Jensen-Shannon distance of the class mix", q.get("js_distance"), JS_DISTANCE_ALERT),
                ("low-confidence image share, x the window's", ratio, LOW_CONFIDENCE_RATIO_ALERT)]
        parts.append("<table><tr><th>figure</th><th>tonight</th><th>alert at</th></tr>")
        for what, value, limit in rows:
            css = "" if value is None else "bad" if value >= limit else "ok"
            parts.append(f"<tr><td>{what}</td><td class='{css}'>{_num(value)}</td><td>{limit}</td></tr>")
        parts.append(f"</table><p>Compared with {_e(q.get('window_runs'))} earlier night(s); mean confidence "
                     f"{_num(q.get('mean_confidence'))} ({_num(q.get('mean_confidence_change'), 4)} against them).</p>")
    for title, png in figures.items():
        parts.append(f"<h2>{_e(title.capitalize())} over the nights</h2><img class='plot' alt='{_e(title)}' "
                     f"src='{_png_data_uri(png)}'>")
    parts.append(f"<h2>The {len(night.gallery)} least confident images</h2><div class='gallery'>")
    for item in night.gallery:
        picture = (f"<img class='overlay' alt='overlay of {_e(item['image_uri'])}' src='{_png_data_uri(item['overlay'])}'>"
                   if item["overlay"] else f"<p class='bad'>{_e(item['problem'])}</p>")
        parts.append(f"<figure>{picture}<figcaption>{_e(item['image_uri'])}<br>confidence "
                     f"{_num(item['mean_confidence'])}, margin {_num(item['mean_margin'])}, low-confidence pixels "
                     f"{_num(item['low_confidence_fraction'])}<br>classes: "
                     f"{', '.join(_e(n) for n in item['class_names'])}</figcaption></figure>")
    parts.append("</div></body></html>")
    return "".join(parts)


def write_report(output: Location, *, run_date: str | None, nights: int, gallery: int) -> dict:
    """Gather, draw and write `reports/report-<night>.html` under the output; returns the summary."""
    night = gather(output, run_date=run_date, nights=nights, gallery=gallery)
    text = render(night, plots(night.quality))
    target = output.child(REPORTS, f"report-{night.run_date}.html")
    target.write_text(text)
    return {"report": target.uri, "run_date": night.run_date, "runs": len(night.runs), "nights": len(night.quality),
            "gallery": len(night.gallery), "bytes": len(text.encode())}
