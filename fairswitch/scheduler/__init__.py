"""Control plane: who runs this step, with how many tokens, and who gives way."""
