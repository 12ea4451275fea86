"""Models read lazily from their safetensors folder: the structure on the meta device, a layer's weights on demand.

Why: the planner, the pages and the spectrum of a 1B+ model need names, shapes and one layer at a time, never the
whole model in memory (issue 18: the Plan page must not load a 1B model in the page process).
"""

from saten_core.lazy.skeleton import skeleton
from saten_core.lazy.weights import StoredLinears, folder_key, read_linear

__all__ = ["StoredLinears", "folder_key", "read_linear", "skeleton"]
