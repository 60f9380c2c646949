"""Filter a COCO detection JSON to some categories: every image is kept, the other annotations dropped.

    python benchmarks/real/make_subset.py --input data/bccd/train.json --output data/wbc/train.json --categories WBC
    python benchmarks/real/make_subset.py --input data/bccd/val.json   --output data/wbc/val.json   --categories WBC

``--categories``: names or ids (comma separated); the kept categories keep their ids. Images left without
a box stay in the file (as negatives), like in any real dataset with empty images.
"""

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--categories", required=True, help="names or ids, comma separated")
    args = p.parse_args(argv)
    data = json.loads(Path(args.input).read_text())
    wanted = {w.strip() for w in args.categories.split(",")}
    cats = [c for c in data["categories"] if c["name"] in wanted or str(c["id"]) in wanted]
    if not cats:
        raise SystemExit(f"none of {sorted(wanted)} among {[c['name'] for c in data['categories']]}")
    ids = {c["id"] for c in cats}
    anns = [a for a in data["annotations"] if a["category_id"] in ids]
    out = {**data, "categories": cats, "annotations": anns}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out))
    with_boxes = len({a["image_id"] for a in anns})
    print(f"wrote {args.output}: {len(data['images'])} images ({with_boxes} with boxes), {len(anns)} boxes, "
          f"categories {[c['name'] for c in cats]}")


if __name__ == "__main__":
    main()
