"""The deployment flags shared by the command lines (`compress`, `eval`, `jobs submit`): --dtype, --materialize.

A module of its own so the jobs command group does not import `saten_core.__main__` (run as `python -m
saten_core`, that module is `__main__`, and importing it by name would execute it a second time).
"""

from __future__ import annotations

import argparse

from saten_core.deploy.dtype import DTYPES


def add_deploy_args(p: argparse.ArgumentParser, default_note: str = "overrides the plan's dtype") -> None:
    """--dtype and --materialize on one sub-command's parser."""
    p.add_argument("--dtype", choices=DTYPES, default=None, help=f"deploy dtype ({default_note})")
    p.add_argument("--materialize", action="store_true",
                   help="opt-in: evaluate with each compressed layer's dense residual cached (faster on CPU, but "
                   "more memory than the original); default: compact, nothing dense kept between calls")
