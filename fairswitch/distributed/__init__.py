"""Tensor parallelism: the rank's group and collectives, and which slice of each weight it holds."""
