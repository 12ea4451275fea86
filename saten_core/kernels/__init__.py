"""Inference kernels for compressed layers: one format (format.py), a reference path, a compiled CPU path, Triton.

The format is the layer's stored layout read as is (kernels consume it, never re-derive it): see format.py.
"""
