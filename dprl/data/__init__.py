"""dprl.data."""
