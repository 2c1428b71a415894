"""Names of the ONNX graph variants an export writes (``onnx.variants`` in export.json and in a
bundle's manifest): shared by the export stage, which writes them, and every reader of a bundle.
Stdlib-only, no imports."""

#: the variant ``draft_graph`` adds; the runtime drafts with it (edgekit.runtime.bundle.open_router)
DRAFT_VARIANT = "onnxruntime_draft"
