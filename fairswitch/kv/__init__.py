"""Paged KV cache: the block pool (who owns which physical block), per-request block tables,
and the device tensor the blocks live in."""
