"""One linear layer's weights read from a safetensors folder (single file or sharded with an index)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def _shard_of(folder: Path) -> dict[str, Path]:
    """tensor name -> the .safetensors file holding it."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: path for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def _read(shards: dict[str, Path], key: str, dtype: torch.dtype) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(shards[key]), framework="pt") as f:
        return f.get_tensor(key).to(dtype)


def read_linear(folder: str | Path, name: str, dtype: torch.dtype = torch.bfloat16,
                shards: dict[str, Path] | None = None) -> nn.Linear:
    """The nn.Linear `name` (a module name, e.g. model.layers.0.mlp.down_proj) with its stored weights at `dtype`.

    Raises ValueError naming the layer when the folder holds no `name.weight` (a checkpoint whose tensor names
    differ from the model's modules: load it whole instead).
    """
    shards = shards if shards is not None else _shard_of(Path(folder))
    key = f"{name}.weight"
    if key not in shards:
        raise ValueError(f"{folder} holds no tensor {key!r}: its tensor names differ from the model's layers")
    weight = _read(shards, key, dtype)
    if weight.dim() != 2:
        raise ValueError(f"tensor {key!r} in {folder} has shape {tuple(weight.shape)}, expected a 2-d weight")
    bias = _read(shards, f"{name}.bias", dtype) if f"{name}.bias" in shards else None
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


class StoredLinears(Sequence):
    """(name, nn.Linear) pairs whose weights are read from the folder when an item is taken, one at a time.

    Why a Sequence: spectrum.weights_fingerprint and the per-layer spectrum loop take layers in order and drop
    each before the next, so a pass over a 1B model holds one layer, not the model.
    """

    def __init__(self, folder: str | Path, names: list[str], dtype: torch.dtype) -> None:
        self.folder, self.names, self.dtype = Path(folder), list(names), dtype
        self.shards = _shard_of(self.folder)
        missing = [n for n in self.names if f"{n}.weight" not in self.shards]
        if missing:
            raise ValueError(f"{folder} holds no tensor {missing[0]}.weight: its tensor names differ from the "
                             "model's layers")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.names[i], read_linear(self.folder, self.names[i], self.dtype, self.shards)


def folder_key(folder: str | Path, dtype: torch.dtype) -> str:
    """A key for the folder's weights as read at `dtype`: names, sizes and mtimes of its files (no read).

    Why: the spectrum cache is keyed on a fingerprint of the values, which needs a pass over every weight; the
    pages look up a 1B model's spectra by this key instead (written next to the cache by a spectrum run).
    """
    folder = Path(folder).resolve()
    h = hashlib.sha256(f"{folder}|{dtype}".encode())
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if path.exists():
            st = path.stat()
            h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def check_safetensors(path: str | Path) -> None:
    """ValueError naming the file when it is not a whole safetensors file: a bad header, or cut short.

    Why here: transformers' loader fails on such a file with a Rust-side error type deep in a traceback; reading
    the 8-byte length and the JSON header is cheap and names the file, so the CLI and the pages say one line.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {n} in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise ValueError(f"{path} is truncated: its tensors need {need} bytes, the file has {size}")
