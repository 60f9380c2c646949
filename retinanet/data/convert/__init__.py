"""Converters from other annotation formats to COCO detection JSON (used by retinanet-convert).

Each returns a COCO dict whose ``file_name``s are relative to the image folder to give as
``data.*_images``; category ids are 1..K (classes sorted by name unless an order is given).
"""

from retinanet.data.convert.common import ConvertError, split_train_val, write_coco
from retinanet.data.convert.csv_rows import convert_csv
from retinanet.data.convert.voc import convert_voc
from retinanet.data.convert.yolo import convert_yolo

CONVERTERS = {"voc": convert_voc, "csv": convert_csv, "yolo": convert_yolo}

__all__ = ["CONVERTERS", "ConvertError", "convert_csv", "convert_voc", "convert_yolo", "split_train_val",
           "write_coco"]
