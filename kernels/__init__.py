"""Attention kernels (imported as ``fairswitch.kernels``), each beside its pure-torch reference.

``reference`` holds the pure-torch paged attention used on CPU and by the tests; Triton kernels
drop in behind the same functions.
"""
