"""``make bench``: our trainer against torchvision's RetinaNet on identical inputs, in the same process.

One module per case: ``loss`` (1), ``postprocess`` (2), ``train`` (3, and the conv peak for 6),
``inference`` and ``endtoend`` (4), ``data`` (5); helpers: ``scene`` (inputs), ``models`` / ``tv``
(our preset and torchvision's model of the same architecture, same weights), ``timing``
(interleaved rounds, medians), ``memory`` (peak RSS in a fresh subprocess), ``report`` (the table).
``runner`` ties them together at a size preset; ``benchmarks/bench.py`` is the command line.
"""
