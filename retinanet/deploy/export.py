"""Export a trained detector to ONNX, TorchScript or a ``torch.export`` program, with a JSON sidecar.

Two graphs (``graph=``):

- ``raw``: ``images`` uint8 ``[B, 3, H, W]`` -> ``cls_logits [B, A, K]``, ``box_deltas [B, A, 4]`` and the
  ``anchors [A, 4]`` of that input size (xyxy pixels, computed in the graph): what the network computes, for
  a deployment that decodes itself (the sidecar holds the box coder and post-processing settings).
- ``end2end``: ``images`` and ``image_sizes`` int64 ``[B, 2]`` (h, w of each resized image before padding)
  -> ``boxes [B, D, 4]`` (xyxy, pixels of the resized input), ``scores [B, D]``, ``labels [B, D]`` (int64,
  -1 = padding) and ``num_detections [B]``: ``PostProcessor.padded`` in the graph (decode, score threshold,
  top-k per level, class-wise NMS, ``D = detections_per_img``), anchors computed from the input size.

Both take any batch size and image size (dynamic axes; the parity tests run several of each). Images are
RGB, resized by the sidecar's rule and zero-padded bottom / right to multiples of ``size_divisible``, as in
training and evaluation; normalisation (ImageNet mean / std) happens inside the graph. Everything is exported in
fp32 on the CPU from the weights ``Detector.from_checkpoint`` runs (the EMA weights when the run kept them).

``end2end`` is exported for ``onnx`` and ``torch_export`` only: TorchScript's tracer would freeze the sizes
that depend on the data (the number of candidates, of NMS survivors) at those of the example images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from retinanet.checkpoint import load_checkpoint
from retinanet.errors import UserError
from retinanet.files import atomic_write_json

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "torch_export")
GRAPHS = ("raw", "end2end")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "torch_export": ".pt2"}
INPUT_NAMES = {"raw": ("images",), "end2end": ("images", "image_sizes")}
OUTPUT_NAMES = {"raw": ("cls_logits", "box_deltas", "anchors"),
                "end2end": ("boxes", "scores", "labels", "num_detections")}
ONNX_OPSET = 18
MAX_SIDE = 8192  # the largest H / W the exported graphs declare (torch.export needs a bound)


class ExportError(UserError):
    """An export setting or file that cannot work; the message names it."""


class RawGraph(nn.Module):
    """The network plus the anchors of the input size: ``images -> (cls_logits, box_deltas, anchors)``."""

    def __init__(self, model: nn.Module, anchors):
        super().__init__()
        self.model, self.anchors = model, anchors

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        anchors = self.anchors.grid(out.feature_shapes, images.shape[-2:], images.device)  # [A, 4]
        return out.cls_logits, out.box_deltas, anchors


class End2EndGraph(nn.Module):
    """Network, anchors and ``PostProcessor.padded``: ``(images, image_sizes) -> (boxes, scores, labels, count)``."""

    def __init__(self, model: nn.Module, anchors, postprocess):
        super().__init__()
        self.model, self.anchors, self.postprocess = model, anchors, postprocess

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor):
        out = self.model(images)
        anchors = self.anchors.grid(out.feature_shapes, images.shape[-2:], images.device)  # [A, 4]
        per_level = self.anchors.num_anchors_per_level(out.feature_shapes)
        return self.postprocess.padded(out.cls_logits, out.box_deltas, anchors, per_level, image_sizes)


def build_graph(detector, graph: str) -> nn.Module:
    """The module exported for ``graph`` (raw / end2end), in eval mode and fp32 on the CPU."""
    if graph not in GRAPHS:
        raise ExportError(f"graph={graph!r} must be one of {list(GRAPHS)}")
    model = detector.model.float().eval()
    if graph == "raw":
        return RawGraph(model, detector.anchors).eval()
    return End2EndGraph(model, detector.anchors, detector.postprocess).eval()


def example_inputs(detector, graph: str, batch: int = 2, blocks: tuple[int, int] = (2, 3)) -> tuple:
    """Inputs to trace with: ``batch`` random images of ``blocks`` x ``size_divisible`` pixels (and their sizes)."""
    div = detector.size_divisible
    h, w = blocks[0] * div, blocks[1] * div
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=gen)
    if graph == "raw":
        return (images,)
    sizes = torch.tensor([[h, w]] + [[h - div // 2, w - div]] * (batch - 1), dtype=torch.int64)
    return images, sizes


def _dynamic_shapes(graph: str) -> dict:
    """Dynamic batch, height and width (up to ``MAX_SIDE``). The graph computes any size correctly (anchors from
    the feature maps it produced); the sidecar asks for multiples of ``size_divisible``, what the network was
    trained and evaluated on (the padding of ``Collate``)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=1, max=MAX_SIDE)
    width = torch.export.Dim("width", min=1, max=MAX_SIDE)
    shapes = {"images": {0: batch, 2: height, 3: width}}
    if graph == "end2end":
        shapes["image_sizes"] = {0: batch}
    return shapes


def export_program(detector, graph: str) -> torch.export.ExportedProgram:
    """``torch.export`` of ``graph`` with dynamic batch and image size (the ONNX export converts this program).

    ``backed_size_oblivious``: size checks that would tell 1 from other sizes (a 1 x 1 P7 map of a small
    image) do not specialise the graph; the one the heads needed is avoided there (``Subnet.forward``).
    """
    module = build_graph(detector, graph)
    import torch.fx.experimental._config as fx_config

    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, example_inputs(detector, graph), dynamic_shapes=_dynamic_shapes(graph))


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def _tensor_specs(detector, graph: str) -> tuple[list[dict], list[dict]]:
    k, d = len(detector.class_names), detector.postprocess.detections_per_img
    images = {"name": "images", "dtype": "uint8", "shape": ["batch", 3, "height", "width"],
              "layout": "NCHW, RGB, 0-255; height and width multiples of size_divisible (zero padding bottom / right)"}
    if graph == "raw":
        outputs = [
            {"name": "cls_logits", "dtype": "float32", "shape": ["batch", "anchors", k],
             "layout": "class logits (sigmoid -> probability) per anchor; anchors level-major (P3..P7), then rows, "
                       "columns, then the anchors of a cell"},
            {"name": "box_deltas", "dtype": "float32", "shape": ["batch", "anchors", 4],
             "layout": "(dx, dy, dw, dh) relative to each anchor: see box_coder"},
            {"name": "anchors", "dtype": "float32", "shape": ["anchors", 4],
             "layout": "xyxy pixels of the input, the same for every image of the batch"}]
        return [images], outputs
    sizes = {"name": "image_sizes", "dtype": "int64", "shape": ["batch", 2],
             "layout": "(height, width) of each resized image before padding: boxes are clipped to it"}
    outputs = [
        {"name": "boxes", "dtype": "float32", "shape": ["batch", d, 4],
         "layout": "xyxy pixels of the resized input image (divide by the resize scale for the original image)"},
        {"name": "scores", "dtype": "float32", "shape": ["batch", d], "layout": "probability, decreasing"},
        {"name": "labels", "dtype": "int64", "shape": ["batch", d],
         "layout": "index into class_names / category_ids; -1 = padding"},
        {"name": "num_detections", "dtype": "int64", "shape": ["batch"],
         "layout": "rows 0..num_detections-1 of each image are detections, the rest padding (zeros, label -1)"}]
    return [images, sizes], outputs


def sidecar(detector, fmt: str, graph: str, model_path: Path, checkpoint, weights: str) -> dict:
    """What a deployment needs besides the model file (written next to it as ``<model file>.json``)."""
    inputs, outputs = _tensor_specs(detector, graph)
    mean = [round(float(v) / 255, 6) for v in detector.model.pixel_mean.flatten()]
    std = [round(float(v) / 255, 6) for v in detector.model.pixel_std.flatten()]
    post = detector.postprocess
    versions = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnx

        versions.update(onnx=onnx.__version__, opset=ONNX_OPSET)
    load = {"onnx": "onnxruntime.InferenceSession(model_file); run(None, {input name: array})",
            "torchscript": "torch.jit.load(model_file)(images)",
            "torch_export": "torch.export.load(model_file).module()(*inputs)"}[fmt]
    if fmt == "torch_export" and graph == "end2end":
        load = ("import retinanet.postprocess first (it registers the op retinanet::class_nms, the per-class NMS), "
                "then " + load)
    return {
        "format": fmt, "graph": graph, "model_file": model_path.name, "load": load, "exported_with": versions,
        "checkpoint": str(checkpoint), "weights": weights,
        "class_names": list(detector.class_names), "category_ids": list(detector.category_ids),
        "resize": {"min_size": detector.min_size, "max_size": detector.max_size,
                   "rule": "scale = min(min_size / shorter side, max_size / longer side) (a null size is left out); "
                           "new side = round(side * scale); area interpolation when shrinking, bilinear otherwise"},
        "size_divisible": detector.size_divisible,
        "padding": "zeros, bottom and right, to multiples of size_divisible (the batch's largest image)",
        "normalization": {"in_model": True, "mean": mean, "std": std,
                          "note": "done inside the graph on 0-255 pixels: (x / 255 - mean) / std; feed raw uint8 RGB"},
        "inputs": inputs, "outputs": outputs,
        "postprocess": {"in_graph": graph == "end2end", "score_thresh": post.score_thresh,
                        "topk_candidates": post.topk_candidates, "nms_thresh": post.nms_thresh,
                        "detections_per_img": post.detections_per_img},
        "box_coder": {"weights": list(post.coder.weights), "clamp": post.coder.clamp,
                      "decode": "cx = dx / wx * aw + ax; w = exp(min(dw / ww, clamp)) * aw (same for y, h); xyxy out"},
        "anchors": {k: v for k, v in detector.config.get("model", {}).get("anchors", {}).items() if k != "_target_"},
    }


def _onnx_translations() -> dict:
    """Our custom op in ONNX: ``retinanet::class_nms`` is ``NonMaxSuppression`` (per batch and class, exact)."""
    from onnxscript import opset18 as op

    from retinanet.postprocess import class_nms  # noqa: F401  (registers torch.ops.retinanet.class_nms)

    def class_nms_onnx(boxes, scores, iou_threshold: float):
        # boxes [B, N, 4] (corners, center_point_box=0), scores [B, K, N]; negative scores are not candidates
        return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[2**62]),
                                    op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[-0.5]))

    return {torch.ops.retinanet.class_nms.default: class_nms_onnx}


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters' chatter off: onnx_ir's INFO lines (one per deduplicated constant) and its warning that an
    empty attribute list defaults to ints (from torchlib's own translations), torch's notice, on every
    torch.jit call, that TorchScript is deprecated (the docs say so once), torchvision's own deprecation notice in
    its nms shape function, and the tracer's note on GroupNorm's input check (``size_prods == 1``: a validation,
    not data flow; ``check_export`` runs the traced file at other sizes)."""
    loggers = {logging.getLogger(name): level for name, level in
               (("onnx_ir", logging.ERROR), ("onnxscript", logging.WARNING), ("torch.onnx", logging.WARNING))}
    levels = [lg.level for lg in loggers]
    try:
        for lg, level in loggers.items():
            lg.setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message="`create_unbacked_symint` is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_detector(detector, fmt: str, graph: str, path: str | os.PathLike, checkpoint="", weights: str = "") -> Path:
    """Write ``detector`` as ``fmt`` / ``graph`` to ``path`` and its sidecar next to it; returns the sidecar path."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} must be one of {list(FORMATS)}")
    if graph not in GRAPHS:
        raise ExportError(f"graph={graph!r} must be one of {list(GRAPHS)}")
    if Path(path).suffix.lower() != SUFFIXES[fmt]:
        raise ExportError(f"output={str(path)!r}: format={fmt} writes a {SUFFIXES[fmt]} file (retinanet-infer and "
                          f"the loaders go by the suffix); name it e.g. {Path(path).stem}{SUFFIXES[fmt]}")
    if fmt == "torchscript" and graph == "end2end":
        raise ExportError("format=torchscript exports graph=raw only: TorchScript's tracer would fix the "
                          "data-dependent sizes of the post-processing (candidates, NMS survivors) at those of the "
                          "example images. Use format=onnx or format=torch_export for graph=end2end")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ExportError(f"format=onnx needs onnx and onnxscript ({err}): pip install -e '.[export]'") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector.model.to("cpu")
    detector.device = torch.device("cpu")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export.save wants the .pt2 suffix
    try:
        with _quiet_exporters():
            if fmt == "torchscript":
                with torch.no_grad():
                    traced = torch.jit.trace(build_graph(detector, graph), example_inputs(detector, graph),
                                             check_trace=False)
                torch.jit.save(traced, str(tmp))
            else:
                program = export_program(detector, graph)
                if fmt == "torch_export":
                    torch.export.save(program, str(tmp))
                else:
                    onnx_program = torch.onnx.export(program, f=None, input_names=list(INPUT_NAMES[graph]),
                                                     output_names=list(OUTPUT_NAMES[graph]), opset_version=ONNX_OPSET,
                                                     external_data=False, dynamo=True, verbose=False,
                                                     custom_translation_table=_onnx_translations())
                    onnx_program.save(str(tmp), external_data=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = sidecar(detector, fmt, graph, path, checkpoint, weights)
    atomic_write_json(meta, sidecar_path(path))
    return sidecar_path(path)


def export_checkpoint(checkpoint, fmt: str, graph: str, path, min_size=None, max_size=None, postprocess=None,
                      weights: str = "auto"):
    """``Detector.from_checkpoint`` (by default the weights that scored: EMA when kept) exported with
    ``export_detector``; returns ``(detector, sidecar path)``."""
    from retinanet.detector import Detector

    ckpt = load_checkpoint(checkpoint)
    detector = Detector.from_checkpoint(checkpoint, "cpu", min_size, max_size, postprocess=postprocess, weights=weights,
                                        ckpt=ckpt, precision="32")  # exported in fp32, checked against fp32
    used = "ema" if weights != "model" and ckpt.get("ema") else "model"
    return detector, export_detector(detector, fmt, graph, path, checkpoint=checkpoint, weights=used)


def load_exported(path: str | os.PathLike, fmt: str):
    """A callable running the exported file on CPU tensors: ``fn(*inputs) -> list of output tensors``."""
    path = Path(path)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *inputs: [torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]
    if fmt == "torchscript":
        with _quiet_exporters():
            module = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "torch_export":
        module = torch.export.load(str(path)).module()
    else:
        raise ExportError(f"format={fmt!r} must be one of {list(FORMATS)}")

    def run(*inputs):
        with torch.no_grad():
            return [o.detach() for o in module(*inputs)]
    return run


RAW_TOLERANCE = 1e-4      # absolute, on logits, deltas and anchors
BOX_TOLERANCE = 1e-2      # pixels, end2end boxes


def _unmatched(expected, got, n: int) -> int:
    """How many of the ``n`` detections ``(boxes, scores, labels)`` of one image in ``expected`` have no partner in
    ``got`` (same label, box within ``BOX_TOLERANCE``, score within 1e-5). Matched as sets: two scores closer than
    float rounding may come in either order."""
    free, missing = list(range(n)), 0
    for i in range(n):
        fits = [j for j in free if got[2][j] == expected[2][i] and abs(float(got[1][j] - expected[1][i])) <= 1e-5
                and float((got[0][j] - expected[0][i]).abs().max()) <= BOX_TOLERANCE]
        if fits:
            free.remove(min(fits, key=lambda j: abs(j - i)))
        else:
            missing += 1
    return missing


def check_export(detector, fmt: str, graph: str, path, sizes=((1, 3, 4), (3, 5, 2))) -> list[dict]:
    """Run the exported file and the PyTorch graph on random images of ``sizes`` (batch, H and W in multiples of
    ``size_divisible``: other than the export's example) and compare. Returns per size the largest absolute
    differences; raises ``ExportError`` beyond ``RAW_TOLERANCE`` (raw), or on other counts or a detection without a
    partner of the same label, box within ``BOX_TOLERANCE`` px and score within 1e-5 (end2end)."""
    exported, module = load_exported(path, fmt), build_graph(detector, graph)
    div, gen, report = detector.size_divisible, torch.Generator().manual_seed(1), []
    for batch, hb, wb in sizes:
        images = torch.randint(0, 256, (batch, 3, hb * div, wb * div), dtype=torch.uint8, generator=gen)
        inputs = (images,) if graph == "raw" else (images, torch.tensor([[hb * div, wb * div]] * batch))
        with torch.no_grad():
            expected = module(*inputs)
        got = exported(*inputs)
        diffs = {name: float((e.double() - g.double()).abs().max()) if e.numel() else 0.0
                 for name, e, g in zip(OUTPUT_NAMES[graph], expected, got)}
        report.append({"shape": list(images.shape), **diffs})
        if graph == "raw":
            bad = {k: v for k, v in diffs.items() if not v <= RAW_TOLERANCE}
        elif diffs["num_detections"] != 0:
            bad = {"num_detections": diffs["num_detections"]}
        else:
            unmatched = sum(_unmatched(e, g, int(n)) for e, g, n in
                            zip(zip(*expected[:3]), zip(*got[:3]), expected[3]))
            bad = {"detections without a match (label, box, score)": unmatched} if unmatched else {}
        if bad:
            raise ExportError(f"{str(path)!r} differs from PyTorch on images {list(images.shape)}: {bad} (tolerances: "
                              f"{RAW_TOLERANCE} on raw outputs; end2end: equal counts, each detection matched with the "
                              f"same label, box within {BOX_TOLERANCE} px, score within 1e-5)")
    return report


def load_sidecar(model_path: str | os.PathLike) -> dict:
    """The sidecar of an exported model file, checked for the keys a runner needs."""
    path = sidecar_path(model_path)
    if not path.is_file():
        raise ExportError(f"{str(model_path)!r} has no sidecar {str(path)!r} (written by retinanet-export next to "
                          "the model file; it holds the classes, the resize and the input / output names)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"sidecar {str(path)!r} cannot be read as JSON: {err}") from err
    needed = ("format", "graph", "class_names", "category_ids", "resize", "size_divisible", "inputs", "outputs",
              "postprocess")
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ExportError(f"sidecar {str(path)!r} lacks {missing} (not written by retinanet-export?)")
    return meta
