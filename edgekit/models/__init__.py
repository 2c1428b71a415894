"""Model sources (hub id, local directory, .gguf file, the embedded default) and text data."""
