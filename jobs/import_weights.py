"""Turn published FCN weights (a state dict with the reference layer names) into this project's checkpoint.

    python jobs/import_weights.py --from fcn8s_from_caffe.pth --model fcn8s --classes voc --convention caffe \\
        --output s3://bucket/models/fcn8s-voc.pt

The checkpoint records the classes and the input convention the weights were trained with (`caffe`: BGR,
0..255, mean subtracted; `torchvision`: RGB, 0..1, ImageNet mean and std), so jobs/label.py and
jobs/evaluate.py preprocess for it. The last stdout line is one JSON summary (output, model_id, md5 of the source).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from models import ARCHITECTURES  # noqa: E402
from pipeline.cli import JobArgumentParser, path_arg, path_or_keyword, print_summary, run_job  # noqa: E402

CONVENTIONS = ("caffe", "torchvision")


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="import_weights.py", description=__doc__.split("\n\n")[0],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", required=True, default=argparse.SUPPRESS, metavar="FILE_OR_URI", type=path_arg,
                   help="state dict with the reference layer names, local or s3:// (required)")
    p.add_argument("--model", required=True, choices=ARCHITECTURES, default=argparse.SUPPRESS,
                   help="architecture the weights belong to (required)")
    p.add_argument("--classes", required=True, default=argparse.SUPPRESS, metavar="voc|FILE", type=path_or_keyword("voc"),
                   help="class names: voc (the 21 PASCAL VOC classes) or a text file with one name per line (required)")
    p.add_argument("--convention", required=True, choices=CONVENTIONS, default=argparse.SUPPRESS,
                   help="preprocessing the weights expect: caffe (BGR, 0..255, mean subtracted) or torchvision (required)")
    p.add_argument("--output", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="checkpoint to write, local or s3:// (required)")
    return p


def read_classes(spec: str) -> list[str]:
    from models import VOC_CLASSES
    from pipeline.dataset_formats import parse_class_names
    from pipeline.errors import JobError
    from pipeline.storage import Location

    if spec == "voc":
        return list(VOC_CLASSES)
    try:
        data = Location.of(spec).read_bytes()
    except FileNotFoundError:
        raise JobError(f"--classes {spec}: no such file (give voc or a file with one class name per line)") from None
    return parse_class_names(data, f"--classes {spec}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models import CAFFE, TORCHVISION, save_checkpoint
    from models.reference_weights import model_from_reference, read_state_dict
    from pipeline.storage import Location, dirname, redact

    class_names = read_classes(args.classes)
    Location.writable(dirname(args.output))  # the folder the checkpoint goes to, before reading 500 MB
    state, md5 = read_state_dict(args.source)
    model = model_from_reference(state, args.model, len(class_names), uri=args.source)
    convention = CAFFE if args.convention == "caffe" else TORCHVISION
    model_id = save_checkpoint(args.output, model, class_names=class_names, convention=convention,
                               metadata={"imported_from": redact(args.source), "source_md5": md5})
    print_summary({"output": args.output, "model_id": model_id, "model": args.model, "classes": len(class_names),
                   "convention": convention.to_dict(), "width_mult": model.width_mult,
                   "source": args.source, "source_md5": md5})
    return 0


if __name__ == "__main__":
    run_job(main)
