"""Per-domain actors: each owns its domain's loads, fill tokens and L1 writes."""
