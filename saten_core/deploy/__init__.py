"""The deployment model: the dtype a model is served in, what it holds in memory, and its speed side by side."""
