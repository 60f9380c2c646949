"""``make bench``: our trainer against torchvision's RetinaNet on identical inputs, in the same process.

One module per case (``loss``, ``postprocess``, ``train``, ``inference``, ``data``, ``flops``), the
shared helpers in ``timing`` (interleaved medians), ``memory`` (peak RSS of a fresh subprocess),
``scene`` (inputs) and ``tv`` (torchvision models of the same architecture); ``report`` prints
the table. ``scripts/bench.py`` is the entry point.
"""
