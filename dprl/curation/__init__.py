"""dprl.curation."""
