"""Convert annotations to COCO detection JSON: Pascal VOC XML, box CSV or YOLO txt.

    retinanet-convert --format voc  --input VOC/Annotations --images VOC/JPEGImages --output mine.json
    retinanet-convert --format csv  --input boxes.csv [--images ROOT] [--classes classes.csv] \
        --output mine.json
    retinanet-convert --format yolo --input dataset/images --classes data.yaml --output mine.json

--input: the VOC XML folder, the CSV file, or the YOLO image folder (searched recursively).
--images: the image folder the COCO file names are relative to (VOC: required; CSV: default the
CSV's folder; YOLO: the --input folder). Give the same folder as data.train_images / data.val_images.
--val-fraction F writes <output stem>_train.json and <output stem>_val.json (a seeded split by image).
"""

import argparse
import logging
import sys
from pathlib import Path

from retinanet.data.convert import CONVERTERS, split_train_val, write_coco
from retinanet.data.convert.common import read_class_names
from retinanet.errors import UserError

log = logging.getLogger("convert_to_coco")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--format", required=True, choices=sorted(CONVERTERS), help="input annotation format")
    p.add_argument("--input", required=True, help="VOC XML folder, CSV file, or YOLO image folder")
    p.add_argument("--images", help="image root the COCO file names are relative to (VOC: required)")
    p.add_argument("--labels", help="YOLO: label folder mirroring --input (default: Ultralytics layout or beside "
                                    "the images)")
    p.add_argument("--classes", help="VOC: class names file (one per line, fixes the order); CSV: class_name,id "
                                     "CSV; YOLO (required): names .txt or data.yaml")
    p.add_argument("--difficult", default="crowd", choices=["crowd", "keep", "drop"],
                   help="VOC difficult objects: crowd = ignore regions (default), keep, or drop")
    p.add_argument("--ids", help="VOC: file listing the XML stems to convert (e.g. ImageSets/Main/train.txt)")
    p.add_argument("--output", required=True, help="COCO JSON to write")
    p.add_argument("--val-fraction", type=float, help="also split into <stem>_train.json / <stem>_val.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> list[Path]:
    if args.format == "voc":
        if not args.images:
            raise UserError("--format voc needs --images (the JPEGImages folder)")
        ids = None
        if args.ids:
            ids = [line.split()[0] for line in Path(args.ids).read_text().splitlines() if line.strip()]
        names = read_class_names(Path(args.classes)) if args.classes else None
        data = CONVERTERS["voc"](args.input, args.images, names, args.difficult, ids)
    elif args.format == "csv":
        data = CONVERTERS["csv"](args.input, args.images, args.classes)
    else:
        if not args.classes:
            raise UserError("--format yolo needs --classes (a names .txt, one per line, or a data.yaml with names:)")
        data = CONVERTERS["yolo"](args.input, args.classes, args.labels)
    out = Path(args.output)
    if args.val_fraction is None:
        outputs = {out: data}
    else:
        train, val = split_train_val(data, args.val_fraction, args.seed)
        outputs = {out.with_name(f"{out.stem}_train.json"): train, out.with_name(f"{out.stem}_val.json"): val}
    for path, part in outputs.items():
        write_coco(part, path)
        print(f"wrote {path}: {len(part['images'])} images, {len(part['annotations'])} boxes, "
              f"{len(part['categories'])} classes ({', '.join(c['name'] for c in part['categories'])})")
    root = args.images or (Path(args.input).parent if args.format == "csv" else args.input)
    print(f"image root (data.train_images / data.val_images): {root}")
    return list(outputs)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        convert(args)
    except (UserError, OSError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
