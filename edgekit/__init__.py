"""edgekit: turn a Hugging Face LLM into deployable edge artifacts.

Importing this package stays light on purpose (no torch, transformers or onnx): the CLI
must answer ``--help`` and reject a bad recipe in well under a second, and heavy
libraries are imported inside the stage functions that need them.
"""

__version__ = "0.1.0"

from edgekit.errors import EdgekitError  # noqa: E402  (re-export; errors.py is stdlib-only)

__all__ = ["EdgekitError", "__version__"]
