"""`make demo`'s flow at a smaller size: synthesize -> train -> label -> DuckDB, twice (re-runnable)."""
import json
import os
import re

import pytest
from PIL import Image

from tests.jobs_util import run_subprocess

# What would look like a failure in a log a person reads (Ray's own INFO lines, deprecations, tracebacks).
ALARMING = re.compile(r"Traceback|Error|ERROR|WARNING|Warning|Deprecat|Failed|failed")


def _demo(args: list[str]) -> dict:
    """`jobs/demo.py` as `make demo` runs it (its own local Ray): its whole log is short and says nothing alarming."""
    proc = run_subprocess("demo", args, timeout=600)
    log = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0, "\n".join(log[-30:])
    assert len(log) <= 40, "\n".join(log)
    # Its own report lines ([demo], the indented tables, the JSON) show the broken file's error row on purpose.
    others = [line for line in log[:-1] if not line.startswith(("[demo]", "    "))]
    assert not [line for line in others if ALARMING.search(line)], "\n".join(others)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# No other Ray on the machine while the demo's runs, as for a user: a second instance confuses Ray Train's
# placement-group cleaner ("Found multiple active Ray instances").
@pytest.mark.multinode
def test_demo_flow_small_and_rerunnable(ray_stopped, tmp_path):
    workdir = str(tmp_path / "demo")
    args = ["--workdir", workdir, "--count", "40", "--size", "48x40", "--epochs", "1", "--previews", "3"]
    first = _demo(args)
    assert first["train"]["epochs"] == 1 and os.path.exists(first["train"]["best_checkpoint"])
    label = first["label"]
    # 8 synthetic val images + the real photos shipped with scikit-image + one broken file.
    assert label["listed"] == label["labelled"] + label["errors"] and label["errors"] == 1
    assert label["labelled"] >= 8 + 3
    assert first["coverage_rows"] >= 1 and first["error_rows"] == 1
    previews = [f for f in os.listdir(first["previews"]) if f.endswith(".png")]
    assert len(previews) == 3
    for name in previews:
        with Image.open(os.path.join(first["previews"], name)) as im:
            im.verify()
    # It ends by pointing at the curves, the TensorBoard folder and the previews.
    with Image.open(first["curves"]) as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(first["tensorboard"]))
    second = _demo(args)  # reuses data and run; labels nothing new
    assert second["label"]["labelled"] == 0 and second["label"]["skipped"] == label["labelled"]
    assert second["train"]["best_checkpoint"] == first["train"]["best_checkpoint"]
