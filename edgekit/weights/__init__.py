"""Model weights on disk, shared by every stage that reads or writes them.

Stages talk through artifacts on disk (edgekit/pipeline); what several of them need to read
or write those artifacts lives here, never in one stage's package:

- :mod:`edgekit.weights.hf`: the quiet transformers import and edgekit's dtype names;
- :mod:`edgekit.weights.checkpoint`: load a checkpoint directory (plain, GPTQ or FP8) and its
  tokenizer;
- :mod:`edgekit.weights.state`: strict state-dict loading (one mismatch wording);
- :mod:`edgekit.weights.layers`: find a causal LM's decoder layers (and the Linears in them);
- :mod:`edgekit.weights.grid`: :class:`~edgekit.weights.grid.QuantizedWeight`, the integer
  grid every weight quantizer produces (RTN lives here; GPTQ and AWQ in edgekit.quantize);
- :mod:`edgekit.weights.packing`: the GPTQ packed-tensor layout of those weights;
- :mod:`edgekit.weights.loader`: GPTQ checkpoints (save, read, load as QuantLinear, dequantize);
- :mod:`edgekit.weights.fp8`: the FP8 (E4M3) format, :class:`~edgekit.weights.fp8.Fp8Linear`,
  and its checkpoints.

Nothing here imports a stage package; importing this package imports nothing heavy (the
modules that define an ``nn.Module`` import torch at their own import time).
"""
