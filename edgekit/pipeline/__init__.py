"""Stage registry, runner (cache + resume + atomic outputs) and manifest."""
