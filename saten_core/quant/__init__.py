"""Weight quantization: round-to-nearest grids, bit packing, the shared OBS solver (GPTQ, SparseGPT), QuantLinear."""
