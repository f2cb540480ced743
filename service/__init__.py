"""HTTP service, configuration, CLI and the composition root."""
