"""Code both the edge and the device import: wire formats, numpy samplers, bundle manifest.

Nothing in this package may import torch or diffusers: the device has neither.
"""
