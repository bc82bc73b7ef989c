"""dprl.curriculum."""
