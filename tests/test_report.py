"""jobs/report.py (issue 32.5): one self-contained HTML file per night, rendered in a real browser (headless
Chromium) and looked at: a screenshot that is not blank, a DOM holding the gallery's images; URIs and class names
shown as text, never as markup. One labeled night (a checkpoint whose class names are HTML, an image whose name
is), named tests over its report."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.testbed import random_checkpoint
from tests.jobs_util import one_error, run_failing_cli
from tests.label_fixtures import FAST_FLAGS, good_image, run_label_job, write_files

HOSTILE_CLASSES = [f"<img src=x{i} onerror=alert({i})>" for i in range(1, 6)]  # every class but background
HOSTILE_FILE = "a<b>'c\".png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    import jobs.report as job
    from pipeline.cli import run_job

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_job(job.main, argv)
    return exc.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def night(ray_module, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    images, output = str(tmp / "photos"), str(tmp / "out")
    files = {f"p{i}.png": good_image(i, 40, 48) for i in range(5)}
    files[HOSTILE_FILE] = good_image(9, 40, 48)
    write_files(images, files)
    names = ["background", *HOSTILE_CLASSES]
    ck = str(tmp / "hostile-names.pt")
    random_checkpoint(ck, names, seed=4)
    code, _, err = run_label_job(["--images", images, "--checkpoint", ck, "--output", output, "--run-date",
                                  "2026-12-06", *FAST_FLAGS])
    assert code == 0, err[-3000:]
    code, stdout, err = _report(["--output", output, "--gallery", "4"])
    assert code == 0, err[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"output": output, "images": images, "summary": summary, "html": open(summary["report"]).read(), "tmp": tmp}


def test_the_report_lands_under_reports_and_its_path_is_the_last_line(night):
    summary = night["summary"]
    assert summary["report"] == os.path.join(night["output"], "reports", "report-2026-12-06.html")
    assert (summary["run_date"], summary["runs"], summary["gallery"]) == ("2026-12-06", 1, 4)


def test_the_report_is_self_contained(night):
    text = night["html"]
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources[:5]
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text


def test_uris_and_class_names_are_text_not_markup(night):
    text = night["html"]
    assert not [n for n in HOSTILE_CLASSES if n in text] and "classes: &lt;img src=x" in text
    assert HOSTILE_FILE not in text and html_escaped(HOSTILE_FILE) in text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_the_gallery_holds_the_least_confident_images_in_order(night):
    from pipeline.label.readers import read_table
    from pipeline.storage import Location

    labels = read_table(Location.of(night["output"]), "labels", columns=["image_uri", "mean_confidence"]).to_pylist()
    expected = [r["image_uri"] for r in sorted(labels, key=lambda r: (r["mean_confidence"], r["image_uri"]))][:4]
    shown = re.findall(r"<figcaption>([^<]*)<br>", night["html"])
    assert shown == [html_escaped(u) for u in expected]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_browser_renders_the_report_with_its_gallery(night, tmp_path):
    report, shot = night["summary"]["report"], str(tmp_path / "report.png")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{report}"],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01, "the screenshot is blank"
    dom = subprocess.run([*base, "--dump-dom", f"file://{report}"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert len(re.findall(r"<img class=\"overlay\"", dom)) == 4
    assert len(re.findall(r"<img class=\"plot\"", dom)) == 3  # class mix, confidence, drift over the nights
    assert "onerror" not in re.sub(r"&lt;[^&]*&gt;", "", dom)  # the hostile name stayed text
    assert "Labels of 2026-12-06" in dom


def test_an_output_without_runs_is_one_line(tmp_path, capsys):
    code, err = run_failing_cli("report", ["--output", str(tmp_path)], capsys)
    line = one_error(code, err)
    assert line == f"error: {tmp_path} holds no labeling runs (no runs/*.json): nothing to report", line


def test_a_night_without_a_run_is_one_line(night, capsys):
    code, err = run_failing_cli("report", ["--output", night["output"], "--run-date", "2026-01-01"], capsys)
    assert "no labeling run on 2026-01-01" in one_error(code, err)
