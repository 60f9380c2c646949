"""An exported ONNX model (``retinanet-export format=onnx``) run with onnxruntime behind the ``Detector``'s
inference interface (``transform``, ``detect_batch``, ``detect``), so ``retinanet-infer checkpoint=model.onnx``
checks the deployed file on a folder exactly as it runs a checkpoint.

The sidecar (``model.onnx.json``) gives the classes, the resize, ``size_divisible`` and the graph kind. The same
resize, padding and mapping back to the original images as the ``Detector``; in between, the ONNX graph:

- ``end2end``: its padded detections (resized-image pixels) are cut to ``num_detections`` and mapped back;
- ``raw``: its ``cls_logits``, ``box_deltas`` and ``anchors`` go through the sidecar's ``PostProcessor``
  settings (``postprocess.<key>=...`` overrides them, as for a checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from retinanet.anchors import AnchorGenerator, feature_shapes
from retinanet.data.transforms import build_transforms
from retinanet.deploy.export import ExportError, load_sidecar
from retinanet.detector import detect_loader
from retinanet.postprocess import PostProcessor, to_original


class OnnxDetector:
    """``path``: an ``.onnx`` file with its sidecar. ``min_size`` / ``max_size``: replace the sidecar's resize."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", min_size: int | None = None,
                 max_size: int | None = None, postprocess: Mapping | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ExportError("running an ONNX model needs onnxruntime: pip install -e '.[export]'") from err
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"model file {str(path)!r} does not exist")
        meta = load_sidecar(path)
        if meta["format"] != "onnx":
            raise ExportError(f"{str(path)!r}: its sidecar says format={meta['format']!r}, not onnx")
        self.path, self.meta, self.graph = path, meta, meta["graph"]
        self.device = torch.device("cpu") if str(device) == "auto" else torch.device(str(device))
        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(self.device.type)
        if provider not in ort.get_available_providers():
            raise ExportError(f"device={device}: onnxruntime here has no {provider or 'provider for it'} "
                              f"(available: {ort.get_available_providers()}); use device=cpu")
        self.session = ort.InferenceSession(str(path), providers=[provider])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.class_names = list(meta["class_names"])
        self.category_ids = [int(c) for c in meta["category_ids"]]
        self.min_size = min_size if min_size is not None else meta["resize"]["min_size"]
        self.max_size = max_size if max_size is not None else meta["resize"]["max_size"]
        self.size_divisible = int(meta["size_divisible"])
        overrides = {k: v for k, v in (postprocess or {}).items() if v is not None}
        changed = {k: v for k, v in overrides.items() if meta["postprocess"].get(k) != v}
        if self.graph == "end2end" and changed:
            baked = {k: meta["postprocess"].get(k) for k in changed}
            raise ExportError(f"postprocess {changed} cannot change {str(path)!r}: its post-processing is in the graph "
                              f"({baked}). Export again with postprocess.<key>=..., or export graph=raw")
        if self.graph == "raw":
            settings = {k: v for k, v in meta["postprocess"].items() if k != "in_graph"}
            self.postprocess = PostProcessor(**{**settings, **overrides})
            self.anchor_strides = AnchorGenerator(**meta["anchors"]).strides
            self.anchors_per_location = AnchorGenerator(**meta["anchors"]).num_anchors_per_location

    def transform(self):
        """The resize of the sidecar (or the one given): the detector's evaluation transform."""
        return build_transforms(False, min_size=self.min_size, max_size=self.max_size)

    def _run(self, images: torch.Tensor, image_sizes: torch.Tensor) -> list[np.ndarray]:
        feeds = {"images": images.cpu().numpy()}
        if "image_sizes" in self.input_names:
            feeds["image_sizes"] = image_sizes.cpu().numpy().astype(np.int64)
        return self.session.run(None, feeds)

    @torch.no_grad()
    def detect_batch(self, batch, criterion=None) -> tuple[list[dict], None]:
        """Detections of a collated batch in original image pixels (like ``Detector.detect_batch``; no losses)."""
        sizes = batch.image_sizes.to(torch.float32)
        outputs = [torch.from_numpy(o) for o in self._run(batch.images, batch.image_sizes)]
        if self.graph == "raw":
            cls_logits, box_deltas, anchors = outputs
            shapes = feature_shapes(batch.images.shape[-2:], self.anchor_strides)
            per_level = [h * w * self.anchors_per_location for h, w in shapes]
            dets = self.postprocess(cls_logits, box_deltas, anchors, per_level, batch.image_sizes, batch.scales)
            return [{k: v.cpu() for k, v in d.items()} for d in dets], None
        boxes, scores, labels, counts = outputs
        dets = []
        for b, n in enumerate(counts.tolist()):
            dets.append({"boxes": to_original(boxes[b, :n], sizes[b], batch.scales[b].to(torch.float32)),
                         "scores": scores[b, :n], "labels": labels[b, :n]})
        return dets, None

    def detect(self, loader, progress: bool = True, desc: str = "detect", criterion=None):
        """Every image of ``loader`` -> ``(detections, image ids, {})``, as ``Detector.detect``."""
        return detect_loader(self.detect_batch, loader, progress, desc)
