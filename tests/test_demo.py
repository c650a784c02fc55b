"""`make demo`'s flow at a smaller size: synthesize -> train -> label -> DuckDB, twice (re-runnable)."""
import os

from PIL import Image

from tests.jobs_util import run_in_process


def test_demo_flow_small_and_rerunnable(ray_session, tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    args = ["--workdir", workdir, "--count", "40", "--size", "48x40", "--epochs", "1", "--previews", "3"]
    first = run_in_process("demo", args, capsys)
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
    second = run_in_process("demo", args, capsys)  # reuses data and run; labels nothing new
    assert second["label"]["labelled"] == 0 and second["label"]["skipped"] == label["labelled"]
    assert second["train"]["best_checkpoint"] == first["train"]["best_checkpoint"]
