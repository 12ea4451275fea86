"""Transformer blocks one at a time: find a model's block list, capture what each block is called with, and walk
calibration + compression block by block (each block's inputs from the already-compressed blocks before it)."""
