"""dprl.sampling."""
