"""The whole product on one machine: synthesize -> train (2 Ray Train workers) -> label -> query.

    python jobs/demo.py [--workdir demo-out] [--s3]

Local filesystem by default; `--s3` runs the same flow against an S3-protocol server: the one named by
AWS_ENDPOINT_URL_S3, or else moto's server started here on loopback. Re-runnable: the dataset and the trained
run are reused, and labeling a second time skips what is already labelled.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from pipeline.cli import JobArgumentParser, print_summary, run_job  # noqa: E402

DEMO_BUCKET = "fcn-demo"


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="demo.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="End-to-end demo: synthetic VOC data, 2-worker training of a reduced-width FCN-8s on "
                            "CPU, labeling of a folder (synthetic + real photos + one broken file), DuckDB queries.")
    p.add_argument("--workdir", default="demo-out", help="local folder for everything the demo writes (and previews)")
    p.add_argument("--s3", action="store_true", help="keep data, runs and labels on an S3-protocol server")
    p.add_argument("--count", type=int, default=600, help="synthetic images (80%% train)")
    p.add_argument("--size", default="64x48", help="synthetic image size WxH")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--previews", type=int, default=6, help="preview overlays to write")
    return p


def _start_s3() -> str:
    """Use AWS_ENDPOINT_URL_S3 if set; otherwise start moto's S3 server on a free loopback port."""
    if not os.environ.get("AWS_ENDPOINT_URL_S3"):
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(key, value)
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists(DEMO_BUCKET):
        fs.mkdir(DEMO_BUCKET)
    return f"s3://{DEMO_BUCKET}/demo"


def _photos() -> list[str]:
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return [os.path.join(folder, n) for n in ("astronaut.png", "coffee.png", "chelsea.png")
            if os.path.exists(os.path.join(folder, n))]


def _query(sql: str, uri: str, params: dict | None = None) -> list[tuple]:
    import duckdb

    con = duckdb.connect()
    if uri.startswith("s3://"):
        import s3fs
        con.register_filesystem(s3fs.S3FileSystem())
    return con.execute(sql, params or {}).fetchall()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    base = _start_s3() if args.s3 else workdir
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers' progress bars would bury the demo's own lines; the jobs themselves keep theirs.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from pipeline import storage
    from pipeline.datasets import read_class_names
    from pipeline.label_output import example_query
    from pipeline.labeling import LabelConfig, label_images
    from pipeline.ray_setup import init_ray
    from pipeline.synthetic import synthesize_voc
    from pipeline.train_config import TrainConfig
    from pipeline.train_run import run_training

    cores = os.cpu_count() or 2
    init_ray(num_cpus=cores)

    data = storage.join(base, "data")
    w, h = (int(v) for v in args.size.lower().split("x"))
    if read_class_names(data) is None:
        print(f"[demo] writing {args.count} synthetic images to {data}", flush=True)
        synthesize_voc(data, args.count, size=(w, h), seed=0)
    else:
        print(f"[demo] reusing the synthetic dataset at {data}", flush=True)
    classes = read_class_names(data)

    print(f"[demo] training a reduced-width FCN-8s on {cores} cores (2 Ray Train workers)", flush=True)
    cfg = TrainConfig(data=data, storage=storage.join(base, "runs"), name="demo", num_classes=len(classes),
                      width_mult=0.0625, padding="same", epochs=args.epochs, batch_size=4, crop_size=min(w, h),
                      min_scale=0.75, max_scale=1.5, optimizer="adam", lr=0.005, amp="off", num_workers=2,
                      cpus_per_worker=max(0.5, min(4.0, (cores - 1) / 2)), max_failures=1)
    train = run_training(cfg)

    # The folder to label; files are written once, so a rerun sees the same versions and skips them.
    images = storage.join(base, "images")
    val_ids = storage.read_text(storage.join(data, "ImageSets", "Segmentation", "val.txt")).split()[:16]
    wanted = {storage.join(images, "synthetic", f"{i}.jpg"): storage.join(data, "JPEGImages", f"{i}.jpg") for i in val_ids}
    wanted.update({storage.join(images, "photos", os.path.basename(p)): p for p in _photos()})
    for dst, src in wanted.items():
        if not storage.exists(dst):
            storage.write_bytes(dst, storage.read_bytes(src))
    broken = storage.join(images, "broken", "truncated.jpg")
    if not storage.exists(broken):
        jpeg = storage.read_bytes(wanted[storage.join(images, "synthetic", f"{val_ids[0]}.jpg")])
        storage.write_bytes(broken, jpeg[: len(jpeg) // 3])

    out = storage.join(base, "labels")
    print(f"[demo] labeling {images} with {train['best_checkpoint']}", flush=True)
    label = label_images(LabelConfig(images=images, checkpoint=train["best_checkpoint"], output=out,
                                     previews=args.previews, max_side=512, progress=False))

    run_date = label.get("run_date") or time.strftime("%Y-%m-%d", time.gmtime())
    coverage = _query(example_query("class_coverage", out), out, {"run_date": run_date})
    errors = _query(f"SELECT image_uri, stage, error FROM read_parquet('{out}/errors/**/*.parquet', "
                    "hive_partitioning = true) WHERE run_id = $run_id", out, {"run_id": label["run_id"]})
    # Overlays sit under previews/run_date=.../<run_id>/; show the newest run's (a rerun labels nothing new).
    previews_root = storage.join(out, "previews")
    pngs = storage.list_files(previews_root, (".png",)) if storage.exists(previews_root) else []
    previews_dir = max((storage.dirname(f.uri) for f in pngs), default=previews_root)
    if args.s3 and pngs:  # bring the pictures home so a person can open them
        local = os.path.join(workdir, "previews", os.path.basename(previews_dir))
        fs, path = storage.filesystem(previews_dir)
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        previews_dir = local

    print("\n[demo] training summary:", json.dumps({k: train[k] for k in (
        "best_mean_iou", "best_epoch", "best_checkpoint", "epochs", "images_per_second")}), flush=True)
    print("[demo] class coverage tonight (DuckDB over labels/ and class_stats/):", flush=True)
    print(f"    {'class':<12}{'images':>8}{'pixels':>10}{'coverage':>10}", flush=True)
    for class_id, name, n_images, pixels, share in coverage:
        print(f"    {name:<12}{n_images:>8}{pixels:>10}{share:>10.3f}", flush=True)
    print("[demo] error rows of this run:", flush=True)
    for uri, stage, error in errors:
        print(f"    {uri} [{stage}] {error}", flush=True)
    print(f"[demo] dataset: {data}\n[demo] checkpoints: {storage.join(base, 'runs', 'demo')}\n"
          f"[demo] labels (Parquet): {out}\n[demo] previews: {previews_dir}", flush=True)
    print_summary({"demo": "s3" if args.s3 else "local", "base": base, "train": {k: train[k] for k in (
        "best_mean_iou", "best_checkpoint", "epochs")}, "label": label, "coverage_rows": len(coverage),
        "error_rows": len(errors), "previews": previews_dir, "seconds": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    run_job(main)
