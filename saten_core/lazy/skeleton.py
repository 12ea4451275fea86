"""The model's modules on the meta device: names, shapes and bytes at the deploy dtype, no weights loaded."""

from __future__ import annotations

import torch

from saten_core.models import (
    REGISTRY,
    LoadedModel,
    _load_tokenizer,
    check_weights,
    config_kind,
    load_config,
    resolve_ref,
)


def skeleton(ref: str, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """A LoadedModel whose model lives on the meta device (device "meta"): dry runs, byte counts and layer tables
    work on it; anything that needs values reads them with lazy.read_linear from `source_dir`.

    Example:
        lm = skeleton("smollm2-135m")
        [p.device.type for p in lm.model.parameters()][:1]   # ['meta']
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from saten_core.deploy.dtype import dtype_name

    name, folder = resolve_ref(ref, dtype_name(dtype))
    config = load_config(folder)
    check_weights(folder)
    kind = REGISTRY[ref].kind if ref in REGISTRY else config_kind(config)
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    return LoadedModel(model=model.eval(), tokenizer=_load_tokenizer(folder), name=name, kind=kind, ref=ref,
                       config=model.config, source_dir=folder, device="meta", dtype=dtype)
