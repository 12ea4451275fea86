"""Saten Studio core library: Saten (sparse augmented tensor network) compression of linear layers.

Nothing heavy is imported here, so `python -m saten_core models` and the dashboard start fast.
"""

import logging
import os

# transformers imports torchao whenever it is installed (it is, for the quantization cross-check tests). Its
# compiled extras are CUDA/MX kernels this project never calls; loading them, and its enum registrations, would
# print warnings on every model load, which the CLI's one-line-error contract and its users do not want.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
