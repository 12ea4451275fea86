"""What a model's weights were stored as before we saw them: the GGUF tensor types of GGUF-derived models.

Why: the embedded SmolLM2 is dequantised from a Q4_1 GGUF, so its "float" block linears already sit on a 4-bit
grid (blocks of 32 along the input, a scale and a minimum each). A 4-bit asymmetric round-to-nearest with groups
of 32 reproduces them almost exactly, and any quantization at >= 4 bits looks better on it than it would on a
16-bit checkpoint. This module reads the source tensor types (metadata only, nothing is dequantised), describes
their grids and sizes, and says when a quantization configuration is aligned with the source's grid.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

# GGUF names of the block linears: the attention and MLP projections inside the transformer blocks
BLOCK_LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
FLOAT_TYPES = ("F64", "F32", "F16", "BF16")
SUPERBLOCK = 256  # K-quants: one superblock of 256 inputs holds the sub-blocks below

# (elements per block, bytes per block), as in gguf.GGML_QUANT_SIZES; used only when that table is unavailable
FALLBACK_SIZES: dict[str, tuple[int, int]] = {
    "F64": (1, 8), "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 40), "Q2_K": (256, 84), "Q3_K": (256, 110),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292),
}

# Uniform grids along the input: (code bits, inputs per scale, symmetric, how the block is stored)
GRIDS: dict[str, tuple[int, int, bool, str]] = {
    "Q4_0": (4, 32, True, "blocks of 32 along the input, one 16-bit scale (symmetric)"),
    "Q4_1": (4, 32, False, "blocks of 32 along the input, a 16-bit scale and minimum (asymmetric)"),
    "Q5_0": (5, 32, True, "blocks of 32 along the input, one 16-bit scale (symmetric)"),
    "Q5_1": (5, 32, False, "blocks of 32 along the input, a 16-bit scale and minimum (asymmetric)"),
    "Q8_0": (8, 32, True, "blocks of 32 along the input, one 16-bit scale (symmetric)"),
    "Q8_1": (8, 32, True, "blocks of 32 along the input, one scale (symmetric) and the block's sum"),
    "Q2_K": (2, 16, False, "superblocks of 256, sub-blocks of 16 with 4-bit scales and minimums"),
    "Q3_K": (3, 16, True, "superblocks of 256, sub-blocks of 16 with 6-bit scales (symmetric)"),
    "Q4_K": (4, 32, False, "superblocks of 256, sub-blocks of 32 with 6-bit scales and minimums"),
    "Q5_K": (5, 32, False, "superblocks of 256, sub-blocks of 32 with 6-bit scales and minimums"),
    "Q6_K": (6, 16, True, "superblocks of 256, sub-blocks of 16 with 8-bit scales (symmetric)"),
    "Q8_K": (8, 256, True, "blocks of 256 along the input, one 32-bit scale (symmetric)"),
}


@dataclass(frozen=True)
class GgmlType:
    """One GGML tensor type: its block layout, its size per weight and, for uniform grids, the grid."""

    name: str
    block_size: int
    type_size: int  # bytes per block
    bits: int | None = None  # code bits of a uniform grid
    group: int | None = None  # inputs sharing one scale (the sub-block for K-quants)
    symmetric: bool | None = None
    description: str = ""

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and minimums included (Q4_1: 20 bytes per 32 weights = 5.0)."""
        return self.type_size * 8 / self.block_size

    @property
    def code_bits(self) -> int:
        """Bits of the codes themselves: a float's width, else the whole bits per weight (Q6_K 6.5625 -> 6)."""
        return self.bits if self.bits is not None else math.floor(self.bits_per_weight)

    def grid(self) -> dict | None:
        """{"bits", "group", "symmetric"} of a uniform grid; None for floats and codebook types (IQ*, TQ*...)."""
        if self.bits is None:
            return None
        return {"bits": self.bits, "group": self.group, "symmetric": self.symmetric}


def _describe(name: str) -> str:
    if name in GRIDS:
        return GRIDS[name][3]
    if name in FLOAT_TYPES:
        return "floating point"
    if name.startswith(("I8", "I16", "I32", "I64")):
        return "integer tensor"
    return "non-uniform (codebook, lattice or float4) grid: no round-to-nearest equivalent"


@functools.lru_cache(maxsize=1)
def ggml_types() -> dict[str, GgmlType]:
    """Every GGML type the installed gguf package knows (its GGML_QUANT_SIZES), else the common ones."""
    try:
        from gguf import GGML_QUANT_SIZES

        sizes = {t.name: (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}
    except ImportError:
        sizes = dict(FALLBACK_SIZES)
    table = {}
    for name, (block, size) in sizes.items():
        bits, group, symmetric, _ = GRIDS.get(name, (None, None, None, ""))
        table[name] = GgmlType(name, block, size, bits, group, symmetric, _describe(name))
    return table


def ggml_type(name: str) -> GgmlType:
    """The type called `name` ('Q4_1'); ValueError naming it when unknown."""
    table = ggml_types()
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown GGML tensor type {name!r}; known: {', '.join(table)}")
    return table[name]


# ---------------------------------------------------------------- reading a GGUF

def _read_tensor_table(path: Path) -> dict[str, list]:
    """{tensor name: [GGML type name, element count]} from the GGUF header (memory-mapped, nothing dequantised)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {exc}") from None
    return {t.name: [t.tensor_type.name, int(t.n_elements)] for t in reader.tensors}


def _disk_cache(path: Path, size: int, mtime_ns: int) -> Path:
    from saten_core.models import model_cache_dir

    where = hashlib.sha256(str(path).encode()).hexdigest()[:12]  # two copies of one file name stay apart
    return model_cache_dir() / "gguf-tensors" / f"{path.stem}-{where}-{size}-{mtime_ns}.json"


@functools.lru_cache(maxsize=8)
def _tensor_table_json(path: str, size: int, mtime_ns: int) -> str:
    """The tensor table as JSON, memoised in memory and on disk: GGUFReader parses the whole tokenizer vocabulary
    (about 2 s for SmolLM2), and `models --json` lists this in a fresh process every time."""
    from saten_core.files import atomic_write_text

    cached = _disk_cache(Path(path), size, mtime_ns)
    try:
        text = cached.read_text()
        json.loads(text)
        return text
    except (OSError, ValueError):
        pass  # absent or damaged: read the GGUF again
    text = json.dumps(_read_tensor_table(Path(path)))
    try:
        atomic_write_text(cached, text)
    except OSError:
        pass  # a read-only cache only costs the next process the read
    return text


def _tensor_table(path: str | Path) -> dict[str, list]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"no GGUF file at {str(path)!r}")
    stat = file.stat()
    return json.loads(_tensor_table_json(str(file.resolve()), stat.st_size, stat.st_mtime_ns))


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name ('blk.0.attn_q.weight' -> 'Q4_1'), read from the GGUF's metadata."""
    return {name: kind for name, (kind, _) in _tensor_table(path).items()}


# ---------------------------------------------------------------- which GGUF a model came from

def _embedded_gguf(name: str) -> Path | None:
    """The GGUF an embedded model is dequantised from (its registry entry's `gguf`; chunks joined on first use)."""
    from saten_core.models import gguf_path

    return gguf_path(name)


def _folder_gguf(folder: Path) -> Path | None:
    """A dequantised cache of an embedded GGUF model (its own folder or a 16-bit copy), or a folder holding one
    GGUF and no safetensors; any other folder has real float weights."""
    from saten_core.models import REGISTRY, model_cache_dir

    if folder.parent == model_cache_dir().resolve():
        for name in REGISTRY:
            if folder.name == name or folder.name.startswith(f"{name}-"):
                return _embedded_gguf(name)
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 and not any(folder.glob("*.safetensors")) else None


def gguf_file(ref: str) -> Path | None:
    """The GGUF file a model reference was dequantised from: an embedded GGUF model, a .gguf path or a folder
    (see _folder_gguf). None for float checkpoints, hub ids and paths that do not exist (nothing to read)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"model reference must be a non-empty string, got {ref!r}")
    from saten_core.models import REGISTRY

    if ref in REGISTRY:
        return _embedded_gguf(ref)
    path = Path(ref).expanduser()
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    return _folder_gguf(path.resolve()) if path.is_dir() else None


def _counts(types: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in types:
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def summarise(path: str | Path) -> dict:
    """The source summary of one GGUF file (see source_quantization)."""
    table = _tensor_table(path)
    linears = {n: v for n, v in table.items() if BLOCK_LINEAR.match(n)}
    params = sum(n for _, n in linears.values())
    bits = sum(n * ggml_type(kind).bits_per_weight for kind, n in linears.values()) / params if params else None
    kinds = {kind for kind, _ in linears.values()}
    grid = ggml_type(kinds.pop()).grid() if len(kinds) == 1 else None
    return {"format": "gguf", "file": str(Path(path).expanduser().resolve()),
            "types": _counts([kind for kind, _ in table.values()]),
            "block_linear_types": _counts([kind for kind, _ in linears.values()]), "block_linear_params": params,
            "bits_per_weight": None if bits is None else round(bits, 6), "grid": grid}


def source_quantization(model_name_or_ref: str) -> dict | None:
    """What a GGUF-derived model's weights were stored as, or None for models with real float weights.

    Keys: format ('gguf'), file, types ({GGML type: tensors}), block_linear_types (the same for the attention /
    MLP projections, blk.N.attn_q ... ffn_down), block_linear_params, bits_per_weight (their parameter-weighted
    stored bits per weight from the GGML type sizes: 5.0 for SmolLM2's Q4_1) and grid ({"bits", "group",
    "symmetric"} when every block linear shares one uniform grid, else None: a Q4_K_M file such as Gemma 3's
    mixes Q5_0, Q8_0, Q4_K and Q6_K, reported as they are). Memoised: a second call reads nothing.

    Example:
        source_quantization("smollm2-135m")["grid"]   # {'bits': 4, 'group': 32, 'symmetric': False}
        source_quantization("gemma3-270m")["grid"]    # None (mixed types)
        source_quantization("minilm-l6")               # None
    """
    path = gguf_file(model_name_or_ref)
    return None if path is None else summarise(path)


def source_label(source: dict) -> str:
    """'Q4_1 source (5.0 bits/weight)': the name of the source's reference line on size charts."""
    kinds = "/".join(source["block_linear_types"]) or "GGUF"
    return f"{kinds} source ({source['bits_per_weight']:.1f} bits/weight)"


def source_table(source: dict) -> list[dict]:
    """One row per tensor type of the source: tensors, how many are block linears, bits/weight, layout."""
    rows = []
    for kind, count in source["types"].items():
        t = ggml_type(kind)
        rows.append({"type": kind, "tensors": count, "block linears": source["block_linear_types"].get(kind, 0),
                     "bits/weight": t.bits_per_weight, "layout": t.description})
    return rows


def source_note(source: dict) -> str:
    """What the source's storage means for every measurement made on the dequantised weights."""
    kinds = ", ".join(source["block_linear_types"])
    head = (f"Every block linear of this model was stored as {kinds} in its GGUF "
            f"({source['bits_per_weight']:.1f} bits/weight); the float weights loaded here are that grid dequantised.")
    grid = source.get("grid")
    if grid is None:
        return head + " Quantizing them again at the source's bits or more looks better than on a 16-bit checkpoint."
    sym = "symmetric" if grid["symmetric"] else "asymmetric"
    return (f"{head} A {grid['bits']}-bit {sym} round-to-nearest with groups of {grid['group']} reproduces them "
            f"almost exactly (an artefact), and any quantization at >= {grid['bits']} bits looks better than it "
            "would on a 16-bit checkpoint. Results and ROI draw the source's own size as a reference line.")


# ---------------------------------------------------------------- sizes and grid alignment

def source_model_bytes(model_bytes: int, block_linear_bytes: int, bits_per_weight: float,
                       dtype_bits: int = 16) -> int:
    """Bytes of the model with its block linears stored as in the source (bits_per_weight each) and the rest as
    counted (`model_bytes` at `dtype_bits` per element, `block_linear_bytes` the block linears' share of it).

    Why: a size chart's x axis counts the original at the deploy dtype, while the source file already held the
    block linears at e.g. 5.0 bits/weight: a compressed model only saves bytes left of that line.
    """
    if not 0 <= block_linear_bytes <= model_bytes:
        raise ValueError(f"block_linear_bytes must lie in [0, model_bytes={model_bytes}], got {block_linear_bytes}")
    if not bits_per_weight > 0:
        raise ValueError(f"bits_per_weight must be > 0, got {bits_per_weight!r}")
    if not isinstance(dtype_bits, int) or dtype_bits <= 0:
        raise ValueError(f"dtype_bits must be a positive integer, got {dtype_bits!r}")
    return round(model_bytes - block_linear_bytes + block_linear_bytes * bits_per_weight / dtype_bits)


def _check_config(bits: int, group: int, symmetric: bool) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ValueError(f"group must be an integer >= 0 (0: per output row), got {group!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be true or false, got {symmetric!r}")


def _source_code_bits(source: dict) -> int | None:
    kinds = [ggml_type(k) for k in source.get("block_linear_types") or {}]
    quantized = [t.code_bits for t in kinds if t.name not in FLOAT_TYPES]
    return min(quantized) if quantized else None


def _aligned(grid: dict, bits: int, group: int, symmetric: bool) -> bool:
    nests = group > 0 and grid["group"] % group == 0
    return bits >= grid["bits"] and nests and (not symmetric or grid["symmetric"])


def grid_artefact(source: dict | None, bits: int, group: int, symmetric: bool) -> str | None:
    """A warning when quantizing a GGUF-derived model at (bits, group, symmetric) measures the source, not the
    method; None when nothing needs saying (no source, float source, fewer bits than the source).

    The rule:
    - aligned (an artefact): the source has one uniform grid, bits >= its bits, and the groups nest: `group`
      divides the source's group (equal included; per-row, group 0, never nests), and the symmetry fits: an
      asymmetric grid contains a symmetric one, a symmetric grid cannot hold an asymmetric source. Every source
      block then lies inside one of the new blocks with as many levels or more, so the source weights are
      reproduced almost exactly (exactly for same bits, group and symmetry under min-max rounding).
    - otherwise, bits >= the source's code bits (the lowest among its block-linear types): a softer note, since
      the weights hold only 2^bits levels per source block and any such grid looks better than on 16 bits.

    Example:
        grid_artefact(src, 4, 32, False)  # 'int4 g32 asym on a Q4_1 source: an artefact (...)'
        grid_artefact(src, 3, 32, False)  # None
    """
    _check_config(bits, group, symmetric)
    if source is None:
        return None
    kinds = "/".join(source.get("block_linear_types") or {}) or "GGUF"
    config = f"int{bits} {'per-row' if group == 0 else f'g{group}'} {'sym' if symmetric else 'asym'}"
    grid = source.get("grid")
    if grid is not None and _aligned(grid, bits, group, symmetric):
        same = (bits, group) == (grid["bits"], grid["group"])
        how = "the weights already sit on this grid" if same else (
            f"it nests in the source's blocks of {grid['group']} and reproduces its {grid['bits']}-bit weights "
            "almost exactly")
        return f"{config} on a {kinds} source: an artefact ({how})"
    source_bits = _source_code_bits(source)
    if source_bits is None or bits < source_bits:
        return None
    return (f"{config} on a {kinds} source: quantization at >= {source_bits} bits looks better on a "
            f"{source_bits}-bit source than on a 16-bit checkpoint")

