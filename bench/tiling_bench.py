"""Tiled labeling (--tile, docs/labeling.md "Large images"): which overlap and blend, what it costs, what it holds.

    python bench/tiling_bench.py agreement [--side 2048]
    python bench/tiling_bench.py throughput [--side 2048] [--tile 512] [--width-mult 0.25] [--rounds 3]
    python bench/tiling_bench.py memory [--megapixels 100] [--tile 512] [--label-encoding raw|png]
    python bench/tiling_bench.py stages [--megapixels 100] [--tile 512] [--label-encoding raw|png]

- agreement: a side x side mosaic of synthetic samples labeled whole (--max-side 0) and in tiles, for tile sizes,
  overlaps and blends, by a narrow FCN-8s fitted to the synthetic set (pipeline.testbed.fitted_checkpoint): the
  share of pixels whose label equals the whole-image pass, within 16 px of tile borders and elsewhere, the accuracy
  against the ground truth, and tiles per megapixel. The defaults are chosen from it.
- throughput: tiles/s of the tiled path (Predictor.predict on one image: tiles, blending, labels and statistics)
  against the bare model's forward passes on the same tiles in the same fixed-slot batches, rounds interleaved
  in one process; the ratio is the figure (at least 0.85).
- memory: jobs/label.py --tile on one image of --megapixels as its own process tree: peak RSS of the inference
  actor and of the write tasks, against the floor (the decoded image and its label map). Ray reuses a worker
  process for decode, write and quality tasks, and each keeps its peak heap, so:
- stages: each stage (decode, the inference actor's call, the write task, the commit-time merge) run on the image
  in its own fresh process, as its task runs it: the memory it adds to what it started with.

Each prints one JSON line; record the figures in bench/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def mosaic(side: int, distinct: int = 256) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.synthetic import render_mosaic

    return render_mosaic(side, distinct=distinct)


def agreement(args) -> dict:
    import torch

    from models import load_checkpoint
    from pipeline.label.canvas import preprocess
    from pipeline.label.inference import Predictor
    from pipeline.label.inference_settings import InferenceSettings
    from pipeline.label.tiling import BLENDS
    from pipeline.testbed import fitted_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as work:
        fitted_checkpoint(os.path.join(work, "fitted.pt"))
        ck = load_checkpoint(os.path.join(work, "fitted.pt"))
    image, truth = mosaic(args.side)
    valid = truth != 255
    whole = Predictor(ck.model, ck.convention, InferenceSettings(max_side=None, batch_size=1)).predict(
        [preprocess(image, None, 32)])[0]
    rows = []
    for tile in (256, 512):
        for overlap in (0.0, 0.125, 0.25, 0.5):
            for blend in BLENDS:
                s = InferenceSettings(max_side=None, batch_size=4, tile=tile, tile_overlap=overlap, tile_blend=blend)
                t = time.perf_counter()
                pred = Predictor(ck.model, ck.convention, s).predict([preprocess(image, None, 32, s.tiling)])[0]
                seconds = time.perf_counter() - t
                agree = pred.label == whole.label
                near = s.tiling.near_borders(args.side, args.side)
                rows.append({"tile": tile, "overlap": overlap, "blend": blend, "tiles": pred.tiles,
                             "tiles_per_mp": round(pred.tiles / (args.side ** 2 / 1e6), 2), "seconds": round(seconds, 2),
                             "agree": round(float(agree.mean()), 5), "agree_near_borders": round(float(agree[near].mean()), 5),
                             "agree_elsewhere": round(float(agree[~near].mean()), 5),
                             "accuracy": round(float((pred.label == truth)[valid].mean()), 5)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"bench": "tiling_agreement", "side": args.side, "model": "fcn8s width 1/16 fitted (pipeline.testbed)",
            "whole_accuracy": round(float((whole.label == truth)[valid].mean()), 5), "rows": rows}


def throughput(args) -> dict:
    import torch

    from models import build_model
    from models.convention import TORCHVISION
    from pipeline.label.canvas import preprocess
    from pipeline.label.inference import Predictor
    from pipeline.label.inference_settings import InferenceSettings

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model("fcn8s", 21, width_mult=args.width_mult, padding="same").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.5)
    image, _ = mosaic(args.side, distinct=64)
    settings = InferenceSettings(max_side=None, batch_size=args.batch_size, tile=args.tile)
    predictor = Predictor(model, TORCHVISION, settings)
    tiling = settings.tiling
    canvases = [tiling.tile_canvas(image, y, x) for y, x in tiling.grid(args.side, args.side)]
    prepared = preprocess(image, None, 32, tiling)

    def tiled() -> int:
        return predictor.predict([prepared])[0].tiles

    def bare() -> int:
        for k in range(0, len(canvases), args.batch_size):
            predictor.forward(canvases[k:k + args.batch_size])
        return len(canvases)

    tiled(), bare()  # warm
    seconds = {"tiled": [], "bare": []}
    for _ in range(args.rounds):
        for name, fn in (("tiled", tiled), ("bare", bare)):
            t = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in seconds.items()}
    n = len(canvases)
    return {"bench": "tiling_throughput", "side": args.side, "tile": args.tile, "tiles": n, "width_mult": args.width_mult,
            "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "tiles_per_s": {k: round(n / v, 3) for k, v in best.items()},
            "megapixels_per_s_tiled": round(args.side ** 2 / 1e6 / best["tiled"], 3),
            "ratio_tiled_vs_bare": round(best["bare"] / best["tiled"], 3),
            "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()}}


def memory(args) -> dict:
    from PIL import Image

    from bench.memory import run_measuring_memory
    from models import VOC_CLASSES
    from pipeline.testbed import random_checkpoint

    side = int((args.megapixels * 1e6) ** 0.5)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        folder = os.path.join(work, "images")
        os.makedirs(folder)
        tile_img, _ = mosaic(1024, distinct=64)
        big = np.tile(tile_img, (side // 1024 + 1, side // 1024 + 1, 1))[:side, :side]
        Image.fromarray(big).save(os.path.join(folder, "big.png"), compress_level=1)
        del big
        checkpoint = os.path.join(work, "fcn8s.pt")
        random_checkpoint(checkpoint, list(VOC_CLASSES), width_mult=args.width_mult, padding="same")
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--images", folder, "--checkpoint", checkpoint,
               "--output", os.path.join(work, "out"), "--no-progress", "--tile", str(args.tile),
               "--max-pixels", str(side * side), "--batch-size", "4", "--label-encoding", args.label_encoding]
        code, stdout, peak = run_measuring_memory(cmd, env=env, cwd=REPO, every=0.1)
        if code != 0:
            raise RuntimeError(f"label job failed ({code}): {stdout.decode()[-2000:]}")
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
    by = peak["by_process"].values()

    def pick(key: str) -> dict:
        """Peak RSS and PSS (MB) of the processes that ran `key`, the largest; RSS counts the object store pages a
        process maps (its input and output blocks), PSS shares them out."""
        runs = [p for p in by if any(key in t for t in p["titles"])]
        return {k: round(max((p[f"{k}_kb"] for p in runs), default=0) / 1024, 1) for k in ("rss", "pss")}

    return {"bench": "tiling_memory", "megapixels": round(side * side / 1e6, 1), "side": side, "tile": args.tile,
            "width_mult": args.width_mult, "labelled": summary["labelled"], "wall_seconds": summary["wall_seconds"],
            "floor_mb": {"decoded_image": round(side * side * 3 / 2**20, 1), "label_map": round(side * side / 2**20, 1),
                         "blend_state_21_classes": round(22 * (side / 8) ** 2 * 4 / 2**20, 1)},
            "label_encoding": args.label_encoding,
            "peak_mb": {"inference_actor": pick("InferenceActor"), "stage_results": pick("stage_results"),
                        "merge_staged": pick("merge_staged"), "decode_tasks": pick("decode_blocks"),
                        "driver": pick("jobs/label.py")},
            "peak_shm_mb": round(peak["shm_kb"] / 1024, 1),
            "processes": [{"rss_mb": round(p["rss_kb"] / 1024, 1), "pss_mb": round(p["pss_kb"] / 1024, 1),
                           "titles": p["titles"]} for p in sorted(by, key=lambda p: -p["rss_kb"])[:10]]}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """VmHWM: this address space's peak RSS (ru_maxrss would carry the parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _one_stage(stage: str, work: str, encoding: str, tile: int) -> dict:
    """One stage of the job on the one image, in this (fresh) process, as its Ray task or actor runs it: its input
    read from the previous stage's Arrow file; (RSS before, peak RSS) in MB."""
    import pyarrow as pa

    from pipeline.label.tiling import Tiling

    def load(name: str) -> pa.Table:  # read into memory (not mapped): the input counts in "before"
        with pa.OSFile(os.path.join(work, name)) as source:
            return pa.ipc.open_file(source).read_all()

    def save(table: pa.Table, name: str) -> None:
        with pa.OSFile(os.path.join(work, name), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    if stage == "decode":
        from pipeline.label.stages import decode_stage

        with open(os.path.join(work, "images", "big.png"), "rb") as f:
            data = f.read()
        batch = pa.table({"image_uri": ["big.png"], "image_version": ["1"], "data": pa.array([data], pa.binary()),
                          "stage": pa.array([None], pa.string()), "error": pa.array([None], pa.string())})
        del data
        before = _rss_mb()
        out = decode_stage(batch, max_pixels=10**9, max_side=1024, canvas_multiple=32, tiling=Tiling(tile))
        save(out, "decoded.arrow")
    elif stage == "actor":
        from models import load_checkpoint
        from pipeline.label.actor import BatchLabeler
        from pipeline.label.inference import Predictor
        from pipeline.label.inference_settings import InferenceSettings

        ck = load_checkpoint(os.path.join(work, "fcn8s.pt"))
        predictor = Predictor(ck.model, ck.convention, InferenceSettings(max_side=1024, batch_size=4, tile=tile))
        batch = load("decoded.arrow")
        before = _rss_mb()
        out = BatchLabeler(predictor, {}, postprocess_encoding=encoding)(batch)
        assert out["error"][0].as_py() is None, out["error"][0]
        save(out, "results.arrow")
    else:
        from pipeline.label.filesets import merge_staged
        from pipeline.label.writer import OutputSettings, stage_results
        from pipeline.storage import Location

        settings = OutputSettings(Location.of(os.path.join(work, "out")), "bench", "2026-12-07", "m", tuple(
            f"c{i}" for i in range(21)), bytes_per_file=256 * 2**20)
        if stage == "write":
            batch = load("results.arrow")
            before = _rss_mb()
            save(stage_results(batch, settings=settings), "staged.arrow")
        else:  # the commit-time merge of that staged file into the group's labels file
            staged = load("staged.arrow")
            before = _rss_mb()
            merge_staged(staged, settings=settings)
    return {"stage": stage, "rss_before_mb": round(before, 1), "peak_rss_mb": round(_peak_mb(), 1),
            "stage_adds_mb": round(_peak_mb() - before, 1)}


def stages(args) -> dict:
    """Each stage in its own fresh process (no Ray): what it adds to the memory it started with."""
    import subprocess

    from PIL import Image

    from models import VOC_CLASSES
    from pipeline.testbed import random_checkpoint

    side = int((args.megapixels * 1e6) ** 0.5)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        os.makedirs(os.path.join(work, "images"))
        tile_img, _ = mosaic(1024, distinct=64)
        Image.fromarray(np.tile(tile_img, (side // 1024 + 1, side // 1024 + 1, 1))[:side, :side]).save(
            os.path.join(work, "images", "big.png"), compress_level=1)
        random_checkpoint(os.path.join(work, "fcn8s.pt"), list(VOC_CLASSES), width_mult=args.width_mult, padding="same")
        rows = []
        for stage in ("decode", "actor", "write", "merge"):
            proc = subprocess.run([sys.executable, __file__, "_stage", stage, work, args.label_encoding, str(args.tile)],
                                  capture_output=True, text=True, cwd=REPO, timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"{stage}: {proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"bench": "tiling_stage_memory", "megapixels": round(side * side / 1e6, 1), "tile": args.tile,
            "label_encoding": args.label_encoding, "width_mult": args.width_mult, "classes": 21,
            "floor_mb": {"decoded_image": round(side * side * 3 / 2**20, 1), "label_map": round(side * side / 2**20, 1),
                         "blend_state": round(22 * (side / 8) ** 2 * 4 / 2**20, 1)}, "stages": rows}


def main() -> None:
    if sys.argv[1:2] == ["_stage"]:
        print(json.dumps(_one_stage(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("--side", type=int, default=2048)
    t = sub.add_parser("throughput")
    t.add_argument("--side", type=int, default=2048)
    t.add_argument("--tile", type=int, default=512)
    t.add_argument("--width-mult", type=float, default=0.25)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--rounds", type=int, default=3)
    for name in ("memory", "stages"):  # one image, as a job and stage by stage
        m = sub.add_parser(name)
        m.add_argument("--megapixels", type=float, default=100.0)
        m.add_argument("--tile", type=int, default=512)
        m.add_argument("--width-mult", type=float, default=0.0625)
        m.add_argument("--label-encoding", default="raw", choices=("raw", "png"))
        m.add_argument("--workdir", default=None)
    args = p.parse_args()
    print(json.dumps({"agreement": agreement, "throughput": throughput, "memory": memory, "stages": stages}[args.what](args)))


if __name__ == "__main__":
    main()
