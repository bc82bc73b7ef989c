"""dprl.parallel."""
