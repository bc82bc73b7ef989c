"""dprl.models."""
