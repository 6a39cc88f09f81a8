"""Data plane: turn a scheduled batch into model inputs, run the model, sample."""
