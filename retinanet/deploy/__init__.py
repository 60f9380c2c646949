"""What deploys and runs a trained detector: export to ONNX / TorchScript / ``torch.export`` (``export``), the
exported ONNX model behind the ``Detector``'s interface (``onnx_detector``), the inputs of inference (``inputs``:
image files, folders, globs, videos), videos (``video``) and ``retinanet-infer``'s job (``infer``: detections
JSON, rendered images and videos)."""
