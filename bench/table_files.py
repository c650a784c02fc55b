"""File sizes per output table on a realistic labeling run: how many files, how large, how many rows.

    python bench/table_files.py [--images 300] [--sides 256,512] [--workdir /tmp/table-files] [--rows-per-file 1000]

Real photos (scikit-image's wheel: astronaut, coffee, chelsea, motorcycle, rocket, ...) cut into `--images`
JPEG crops with a long side in `--sides`, 1% broken files among them, labeled by a reduced-width FCN-8s with random
score layers and the 21 PASCAL VOC class names, at the job's defaults (`--rows-per-file 1000`, raw label maps).
Then the rows of each table are written again, repeated to 1,000 images per file (a file set at the default) and,
for the small tables, to `--images-per-small-file` (10,000: pipeline.label.filesets), with new URIs and the job's
Parquet settings. Prints one JSON line: per table, files and bytes as the run wrote them, bytes per image, the size
of a file at those image counts, and files per 100M images.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402

VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "color.png",
          "hubble_deep_field.jpg", "retina.jpg")


def make_images(folder: str, n: int, sides: tuple[int, int], seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    from pipeline.testbed import sample_photo_paths

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sample_photo_paths(PHOTOS)]
    for i in range(n):
        sub = os.path.join(folder, f"d{i % 37:02d}")
        os.makedirs(sub, exist_ok=True)
        if i % 100 == 99:
            with open(os.path.join(sub, f"img{i:06d}.jpg"), "wb") as f:
                f.write(b"not a jpeg")
            continue
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(min(h, 200), h + 1), rng.integers(min(w, 200), w + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(photo[y:y + ch, x:x + cw])
        side = int(rng.integers(sides[0], sides[1] + 1))
        img = img.resize((side, max(1, round(side * ch / cw))) if cw >= ch else (max(1, round(side * cw / ch)), side))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=88)
        with open(os.path.join(sub, f"img{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())


def file_bytes_at(n: int, table: str, files: list[str], images: int) -> int:
    """Bytes of one file of `table` holding `n` images' rows: the run's rows repeated under new URIs."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.label.commit import parquet_bytes
    from pipeline.label.tables import SCHEMAS

    rows = pa.concat_tables([pq.read_table(p) for p in files]).cast(SCHEMAS[table])
    copies, total = [], 0
    while total < n * max(1, rows.num_rows) // max(1, images):
        uri = pc.binary_join_element_wise(rows["image_uri"], pa.scalar(f"#{len(copies)}"), "")
        copies.append(rows.set_column(rows.schema.get_field_index("image_uri"), rows.schema.field("image_uri"), uri))
        total += rows.num_rows
    big = pa.concat_tables(copies).slice(0, n * rows.num_rows // max(1, images))
    return len(parquet_bytes(big))


def measure(output: str, images: int, per_small_file: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline.label.readers import list_table_files
    from pipeline.label.tables import INDEX, TABLES
    from pipeline.storage import Location

    out = Location.of(output)
    result = {}
    for table in (*TABLES, INDEX):
        files = list_table_files(out, table)
        sizes = [os.path.getsize(p) for p in files]
        rows = [pq.ParquetFile(p).metadata.num_rows for p in files]
        per_image = sum(sizes) / images
        result[table] = {"files": len(files), "rows": sum(rows), "rows_per_file": rows,
                         "bytes_min": min(sizes), "bytes_median": int(statistics.median(sizes)), "bytes_max": max(sizes),
                         "bytes_per_image": round(per_image, 1),
                         "bytes_per_file_at_1000_images": file_bytes_at(1000, table, files, images)}
        if table != "labels":  # one file per images_per_small_file images (pipeline.label.filesets)
            result[table][f"bytes_per_file_at_{per_small_file}_images"] = file_bytes_at(per_small_file, table, files, images)
        result[table]["files_per_100M_images"] = round(1e8 / (1000 if table == "labels" else per_small_file))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sides", default="256,512", help="range of the images' long side, px")
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--images-per-small-file", type=int, default=10_000)
    p.add_argument("--workdir", default="/tmp/table-files")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.label.config import LabelConfig
    from pipeline.label.job import label_images
    from pipeline.testbed import random_checkpoint

    images, output = os.path.join(args.workdir, "images"), os.path.join(args.workdir, "out")
    if not os.path.exists(images):
        make_images(images, args.images, tuple(int(x) for x in args.sides.split(",")))
    shutil.rmtree(output, ignore_errors=True)
    checkpoint = os.path.join(args.workdir, "fcn8s-voc-random.pt")
    if not os.path.exists(checkpoint):
        random_checkpoint(checkpoint, VOC, width_mult=1 / 16)
    summary = label_images(LabelConfig(images=images, checkpoint=checkpoint, output=output, progress=False,
                                       rows_per_file=args.rows_per_file,
                                       images_per_small_file=args.images_per_small_file))
    print(json.dumps({"images": args.images, "labelled": summary["labelled"], "errors": summary["errors"],
                      "rows_per_file_flag": args.rows_per_file, "wall_seconds": summary["wall_seconds"],
                      "images_per_small_file": args.images_per_small_file,
                      "tables": measure(output, summary["labelled"] + summary["errors"], args.images_per_small_file)}))


if __name__ == "__main__":
    main()
