"""dprl.rl."""
