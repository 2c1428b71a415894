"""``edgekit plan``: predicted memory fit, decode speed and time to first token of a model on
each target, from its config alone (no weights), before any compression.

* :mod:`edgekit.planning.roofline` — the arithmetic (bytes, FLOPs, roofline times);
* :mod:`edgekit.planning.hardware` — bandwidth and peak compute read from a target profile;
* :mod:`edgekit.planning.calibration` — published TensorRT-class measurements and the
  efficiency fitted to them;
* :mod:`edgekit.planning.report` — the plan as a JSON-ready dict.

Every number this package produces is a prediction. Only stdlib, pydantic and PyYAML are
imported (and gguf for a .gguf model): never torch.
"""
