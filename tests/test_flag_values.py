"""Bad flag values, every job: NaN, inf and out-of-range numbers, and names that would leave their folder ('..', '/').

Each is refused in one `error: ...` line with exit status 2, before Ray starts and before anything is written. The
rows run in this process through `run_job`, as jobs/X.py runs it, with Ray's start as a tripwire; the rows marked
"subprocess" run the real command line (`python jobs/X.py ...`) instead. jobs/import_weights.py has no numeric or
name flag (its flags are paths and choices), so it has no row.
"""
from __future__ import annotations

import contextlib
import io
import os

import pytest

from pipeline.synthetic import synthesize_voc
from tests.jobs_util import load_job, run_subprocess

NAME = "without '/' or '\\' (not empty, '.' or '..')"


def _finite(flag: str, bounds: str, value: str, unit: str = "") -> str:
    return f"{flag} must be a finite number{unit} {bounds}, got {value}"


def _invalid(flag: str, kind: str, value: str) -> str:
    """argparse's own refusal of a value its `type` cannot convert (int('nan'), int('inf'))."""
    return f"argument {flag}: invalid {kind} value: {value!r}"


SECONDS = " of seconds"

# (job, flags, fragment of the one error line); the first flag is the one the line must name.
ROWS = [
    # ----------------------------------------------------------------- jobs/train.py: floats
    ("train", ["--lr", "nan"], _finite("--lr", "in (0, 10]", "nan")),
    ("train", ["--lr", "inf"], _finite("--lr", "in (0, 10]", "inf")),
    ("train", ["--lr", "0"], _finite("--lr", "in (0, 10]", "0.0")),
    ("train", ["--lr", "-0.01"], _finite("--lr", "in (0, 10]", "-0.01")),
    ("train", ["--dropout", "1.5"], _finite("--dropout", "in [0, 1)", "1.5")),
    ("train", ["--dropout", "1"], _finite("--dropout", "in [0, 1)", "1.0")),
    ("train", ["--dropout", "nan"], _finite("--dropout", "in [0, 1)", "nan")),
    ("train", ["--dropout", "-0.1"], _finite("--dropout", "in [0, 1)", "-0.1")),
    ("train", ["--width-mult", "nan"], _finite("--width-mult", "in [0.015625, 1]", "nan")),
    ("train", ["--width-mult", "0"], _finite("--width-mult", "in [0.015625, 1]", "0.0")),
    ("train", ["--width-mult", "2"], _finite("--width-mult", "in [0.015625, 1]", "2.0")),
    ("train", ["--min-scale", "nan"], _finite("--min-scale", "in (0, 8]", "nan")),
    ("train", ["--min-scale", "0"], _finite("--min-scale", "in (0, 8]", "0.0")),
    ("train", ["--max-scale", "inf"], _finite("--max-scale", "in (0, 8]", "inf")),
    ("train", ["--max-scale", "0.25"], "--max-scale must be >= --min-scale (0.5), got 0.25"),
    ("train", ["--max-scale", "1e300"], _finite("--max-scale", "in (0, 8]", "1e+300")),  # crashed in a data worker
    ("train", ["--lr", "1e300"], _finite("--lr", "in (0, 10]", "1e+300")),
    ("train", ["--width-mult", "1e-300"], _finite("--width-mult", "in [0.015625, 1]", "1e-300")),
    ("train", ["--cpus-per-worker", "0.00001"], _finite("--cpus-per-worker", ">= 0.0001", "1e-05")),  # Ray refuses it
    ("train", ["--stall-timeout", "1e-300"], _finite("--stall-timeout", "in [1, 1e+09)", "1e-300", SECONDS)),
    ("train", ["--momentum", "nan"], _finite("--momentum", "in [0, 1)", "nan")),
    ("train", ["--momentum", "1"], _finite("--momentum", "in [0, 1)", "1.0")),
    ("train", ["--momentum", "-0.5"], _finite("--momentum", "in [0, 1)", "-0.5")),
    ("train", ["--weight-decay", "nan"], _finite("--weight-decay", ">= 0", "nan")),
    ("train", ["--weight-decay", "-1"], _finite("--weight-decay", ">= 0", "-1.0")),
    ("train", ["--weight-decay", "inf"], _finite("--weight-decay", ">= 0", "inf")),
    ("train", ["--poly-power", "nan"], _finite("--poly-power", ">= 0", "nan")),
    ("train", ["--poly-power", "-1"], _finite("--poly-power", ">= 0", "-1.0")),
    ("train", ["--cpus-per-worker", "nan"], _finite("--cpus-per-worker", ">= 0.0001", "nan")),
    ("train", ["--cpus-per-worker", "inf"], _finite("--cpus-per-worker", ">= 0.0001", "inf")),
    ("train", ["--cpus-per-worker", "0"], _finite("--cpus-per-worker", ">= 0.0001", "0.0")),
    ("train", ["--data-cpus", "nan"], _finite("--data-cpus", ">= 0.0001", "nan")),
    ("train", ["--data-cpus", "-1"], _finite("--data-cpus", ">= 0.0001", "-1.0")),
    ("train", ["--wait-for-resources", "nan"], _finite("--wait-for-resources", ">= 0", "nan", SECONDS)),
    ("train", ["--wait-for-resources", "inf"], _finite("--wait-for-resources", ">= 0", "inf", SECONDS)),
    ("train", ["--wait-for-resources", "-1"], _finite("--wait-for-resources", ">= 0", "-1.0", SECONDS)),
    ("train", ["--stall-timeout", "nan"], _finite("--stall-timeout", "in [1, 1e+09)", "nan", SECONDS)),
    ("train", ["--stall-timeout", "inf"], _finite("--stall-timeout", "in [1, 1e+09)", "inf", SECONDS)),
    ("train", ["--stall-timeout", "0"], _finite("--stall-timeout", "in [1, 1e+09)", "0.0", SECONDS)),
    # ----------------------------------------------------------------- jobs/train.py: integers
    ("train", ["--epochs", "nan"], _invalid("--epochs", "int", "nan")),
    ("train", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("train", ["--num-classes", "inf"], _invalid("--num-classes", "int", "inf")),
    ("train", ["--num-classes", "0"], "--num-classes must be in [1, 256], got 0"),
    ("train", ["--num-classes", "300"], "--num-classes must be in [1, 256], got 300"),
    ("train", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("train", ["--crop-size", "-8"], "--crop-size must be >= 1, got -8"),
    ("train", ["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    ("train", ["--num-workers", "0"], "--num-workers must be >= 1, got 0"),
    ("train", ["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    ("train", ["--seed", str(2**64)], f"--seed must be in [0, 4294967295], got {2**64}"),
    ("train", ["--max-failures", "-2"], "--max-failures must be >= 0, got -2"),
    ("train", ["--keep-best", "0"], "--keep-best must be >= 1, got 0"),
    ("train", ["--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
    # ----------------------------------------------------------------- jobs/train.py: names that become paths
    ("train", ["--name", ".."], f"--name must be a run name {NAME}, got '..'"),
    ("train", ["--name", "."], f"--name must be a run name {NAME}, got '.'"),
    ("train", ["--name", ""], f"--name must be a run name {NAME}, got ''"),
    ("train", ["--name", "a/../.."], f"--name must be a run name {NAME}, got 'a/../..'"),
    ("train", ["--name", "a\\b"], f"--name must be a run name {NAME}, got 'a\\\\b'"),
    ("train", ["--train-split", "../../train"], f"--train-split must be a split name {NAME}, got '../../train'"),
    ("train", ["--val-split", ".."], f"--val-split must be a split name {NAME}, got '..'"),
    # ----------------------------------------------------------------- jobs/label.py
    ("label", ["--cpus-per-actor", "nan"], _finite("--cpus-per-actor", ">= 0.0001", "nan")),
    ("label", ["--cpus-per-actor", "inf"], _finite("--cpus-per-actor", ">= 0.0001", "inf")),
    ("label", ["--cpus-per-actor", "0"], _finite("--cpus-per-actor", ">= 0.0001", "0.0")),
    ("label", ["--wait-for-resources", "nan"], _finite("--wait-for-resources", ">= 0", "nan", SECONDS)),
    ("label", ["--wait-for-resources", "inf"], _finite("--wait-for-resources", ">= 0", "inf", SECONDS)),
    ("label", ["--wait-for-resources", "-1"], _finite("--wait-for-resources", ">= 0", "-1.0", SECONDS)),
    ("label", ["--previews", "-1"], "--previews must be >= 0, got -1"),
    ("label", ["--previews", "nan"], _invalid("--previews", "int", "nan")),
    ("label", ["--rows-per-file", "0"], "--rows-per-file must be >= 1, got 0"),
    ("label", ["--max-side", "-1"], "--max-side must be >= 1"),
    ("label", ["--canvas-multiple", "0"], "--canvas-multiple must be in [1, 1024], got 0"),
    # --tile (issue 34): a tile smaller than the model can take, off the canvas multiple, overlap outside [0, 0.9)
    ("label", ["--tile", "32"], "--tile 32 is smaller than the model can take: at least 64 pixels"),
    ("label", ["--tile", "0"], "--tile 0 is smaller than the model can take"),
    ("label", ["--tile", "100"], "--tile 100 is not a multiple of the canvas multiple 32 (--canvas-multiple; 128 with "
                                 "--compile): try 128"),
    ("label", ["--tile", "100", "--canvas-multiple", "4"], "--tile 100 is not a multiple of 8, the blending's score stride: try 104"),
    ("label", ["--tile", "100", "--canvas-multiple", "3"], "--tile 100 is not a multiple of the canvas multiple 3"),
    ("label", ["--tile", "9000"], "--tile 9000 is over 8192: every tile is a full canvas"),
    ("label", ["--tile", "512", "--max-pixels", "800000000"], "--max-pixels 800000000 is too many with --tile: at most 715,827,882"),
    ("label", ["--tile-overlap", "0.9"], _finite("--tile-overlap", "in [0, 0.9)", "0.9")),
    ("label", ["--tile-overlap", "-0.1"], _finite("--tile-overlap", "in [0, 0.9)", "-0.1")),
    ("label", ["--tile-overlap", "nan"], _finite("--tile-overlap", "in [0, 0.9)", "nan")),
    ("label", ["--tile-blend", "median"], "argument --tile-blend: invalid choice: 'median'"),
    ("label", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("label", ["--batch-size", "1000000000"], "--batch-size must be in [1, 1024], got 1000000000"),  # slots
    ("label", ["--canvas-multiple", "100000"], "--canvas-multiple must be in [1, 1024], got 100000"),  # 30 GB canvases
    ("label", ["--batch-size", "nan"], _invalid("--batch-size", "optional_int", "nan")),
    ("label", ["--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
    ("label", ["--max-bytes", "0"], "--max-bytes must be >= 1, got 0"),
    ("label", ["--num-gpus", "-1"], "--num-gpus must be >= 0, got -1"),
    ("label", ["--actors", "0"], "--actors must be >= 1, got 0"),
    ("label", ["--threads-per-actor", "inf"], _invalid("--threads-per-actor", "optional_int", "inf")),
    ("label", ["--threads-per-actor", "0"], "--threads-per-actor must be >= 1, got 0"),
    ("label", ["--run-id", "../escape"], "--run-id must start with a letter or digit"),
    ("label", ["--run-id", "a/b"], "--run-id must start with a letter or digit"),
    ("label", ["--run-date", "../2026-01-05"], "--run-date must be a date YYYY-MM-DD"),
    ("label", ["--run-date", "\uff12\uff10\uff12\uff16-01-01"], "--run-date must be a date YYYY-MM-DD"),  # fullwidth digits
    ("label", ["--cpus-per-actor", "0.00001"], _finite("--cpus-per-actor", ">= 0.0001", "1e-05")),  # Ray's smallest step
    # ----------------------------------------------------------------- jobs/evaluate.py
    ("evaluate", ["--cpus-per-actor", "nan"], _finite("--cpus-per-actor", ">= 0.0001", "nan")),
    ("evaluate", ["--cpus-per-actor", "inf"], _finite("--cpus-per-actor", ">= 0.0001", "inf")),
    ("evaluate", ["--cpus-per-actor", "0"], _finite("--cpus-per-actor", ">= 0.0001", "0.0")),
    ("evaluate", ["--actors", "0"], "--actors must be >= 1, got 0"),
    ("evaluate", ["--actors", "nan"], _invalid("--actors", "int", "nan")),
    ("evaluate", ["--split", "../../val"], f"--split must be a split name {NAME}, got '../../val'"),
    ("evaluate", ["--split", ".."], f"--split must be a split name {NAME}, got '..'"),
    # ----------------------------------------------------------------- jobs/synthesize.py
    ("synthesize", ["--count", "0"], "--count must be >= 1, got 0"),
    ("synthesize", ["--count", "nan"], _invalid("--count", "int", "nan")),
    ("synthesize", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("synthesize", ["--val-fraction", "nan"], "in [0, 1), got nan"),
    ("synthesize", ["--val-fraction", "inf"], "in [0, 1), got inf"),
    ("synthesize", ["--val-fraction", "1"], "in [0, 1), got 1.0"),
    ("synthesize", ["--size", "0x12"], "argument --size: must be WIDTHxHEIGHT"),
    ("synthesize", ["--size", "100000x100000"], "argument --size: must be WIDTHxHEIGHT with integers from 1 to 4096"),
    # ----------------------------------------------------------------- jobs/demo.py
    ("demo", ["--count", "0"], "--count must be >= 1, got 0"),
    ("demo", ["--count", "inf"], _invalid("--count", "int", "inf")),
    ("demo", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("demo", ["--previews", "-1"], "--previews must be >= 0, got -1"),
    ("demo", ["--size", "64x0"], "argument --size: must be WIDTHxHEIGHT"),
]

# The issue's own commands, also as real subprocesses (each imports torch again: a few seconds).
SUBPROCESS = {("label", "--cpus-per-actor", "nan"), ("train", "--name", "..")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Real tiny inputs, so that a job gets past its argument parsing: a VOC dataset, a checkpoint of its classes,
    a folder of images."""
    from pipeline.dataset_formats import read_class_names
    from pipeline.storage import Location
    from pipeline.testbed import random_checkpoint

    root = tmp_path_factory.mktemp("inputs")
    data = str(root / "data")
    synthesize_voc(data, 4, size=(32, 24), seed=0, val_fraction=0.5)
    checkpoint = str(root / "fcn8s.pt")
    random_checkpoint(checkpoint, read_class_names(Location.of(data)))
    return {"data": data, "checkpoint": checkpoint, "images": os.path.join(data, "JPEGImages")}


def _base_argv(job: str, inputs: dict, tmp) -> list[str]:
    """Arguments that get each job past parsing to its cluster work; a row's flags come after them (and win)."""
    return {
        "train": ["--data", inputs["data"], "--storage", str(tmp / "parent" / "runs"), "--name", "x", "--num-classes",
                  "6", "--width-mult", "0.0625", "--padding", "same", "--num-workers", "2", "--cpus-per-worker", "0.5",
                  "--epochs", "1", "--batch-size", "2", "--crop-size", "24"],
        "label": ["--images", inputs["images"], "--checkpoint", inputs["checkpoint"], "--output", str(tmp / "out"),
                  "--no-progress"],
        "evaluate": ["--data", inputs["data"], "--checkpoint", inputs["checkpoint"]],
        "synthesize": ["--output", str(tmp / "syn"), "--count", "2", "--size", "16x12"],
        "demo": ["--workdir", str(tmp / "demo"), "--count", "10"],
    }[job]


def _cluster_work(*args, **kwargs):
    raise AssertionError("the job started Ray before refusing its flags")


def _in_process(job: str, argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of jobs/<job>.py run as its `__main__` runs it, with every way to start Ray a tripwire."""
    import ray

    import pipeline.label.job
    import pipeline.ray_setup
    import pipeline.train.run
    from pipeline.cli import run_job

    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(buffer), pytest.raises(SystemExit) as exc:
        for module in (pipeline.ray_setup, pipeline.train.run, pipeline.label.job):
            patch.setattr(module, "init_ray", _cluster_work)
        patch.setattr(ray, "init", _cluster_work)
        for name in ("RAY_AUTH_MODE", "RAY_DATA_DISABLE_PROGRESS_BARS"):  # demo.py sets them for its Ray
            patch.delenv(name, raising=False)
        run_job(load_job(job).main, argv)
    return exc.value.code, buffer.getvalue()


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("job,flags,fragment", ROWS, ids=[f"{job} {' '.join(flags)}" for job, flags, _ in ROWS])
def test_bad_flag_values_are_one_line_before_any_work(job, flags, fragment, inputs, tmp_path):
    (tmp_path / "parent").mkdir()  # --storage's parent: a run name must never leave --storage
    before = _tree(tmp_path)
    argv = [*_base_argv(job, inputs, tmp_path), *flags]
    if (job, *flags) in SUBPROCESS:
        proc = run_subprocess(job, argv, timeout=300)
        code, err = proc.returncode, proc.stderr
        assert "Started a local Ray instance" not in proc.stderr + proc.stdout, err[-3000:]
    else:
        code, err = _in_process(job, argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert fragment in errors[0] and flags[0] in errors[0], errors[0]
    assert _tree(tmp_path) == before  # nothing written: not the output, not a run folder, not --storage's parent
