"""Saten Studio core library: Saten (sparse augmented tensor network) compression of linear layers.

Nothing heavy is imported here, so `python -m saten_core models` and the dashboard start fast.
"""

__version__ = "0.1.0"
