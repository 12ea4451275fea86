"""Block-sequential calibration and compression (what SparseGPT, GPTQ and llm-compressor do).

One forward of the original model over the calibration windows records the hidden states entering the first block
and the keyword arguments every block is called with (attention masks, rotary embeddings: they depend on positions
only, and may differ per block, e.g. Gemma 3's sliding-window layers). Then, block by block: hook the block's
planned linears, run the block on the current hidden states to collect their input statistics, compress them,
free the statistics, and run the compressed block to produce the next block's inputs. Errors made early are thus
seen (and compensated) by later blocks, and only one block's statistics are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saten_core.lazy.pages import byte_ranges, release_mapped, trim_heap

Progress = Callable[[str, float, str], None]


@dataclass
class BlockCall:
    """One calibration window's call of a block: positional args (hidden states first, unless passed by name)."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor | None) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall((), {**self.kwargs, "hidden_states": hidden})


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the longest nn.ModuleList of the model whose entries hold linear layers.

    Raises ValueError naming the model type when there is none (an architecture this walk cannot drive).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_has_linear(b) for b in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"model type {kind}: no list of transformer blocks (an nn.ModuleList of layers holding "
                         "linear layers) found, so it cannot be walked block by block")
    return best


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or type(m).__name__ in ("SatenLinear", "QuantLinear")
               for m in module.modules())


class _Captured(Exception):
    """Raised by the last block's stand-in: every block's call is recorded, the rest of the forward is not needed."""


def capture_calls(model: nn.Module, blocks: nn.ModuleList, windows: list[torch.Tensor],
                  decoder: bool) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """(hidden states entering the first block per window, per block each window's call with its hidden states
    left out), from one forward of the model as it is now (the original).

    Why stand-ins: a block's keyword arguments (masks, rotary embeddings) depend on positions only, so during the
    capture every block passes its input through unchanged and the forward stops at the last block: the capture
    costs the embeddings, not a forward of every block and of a 128k-vocabulary head in 16-bit.
    """
    first: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    wrap: list[Callable[[torch.Tensor], Any]] = []  # how a block returns its hidden states (tensor or tuple)

    def stand_in(index: int, block: nn.Module):
        real = block.forward

        def forward(*args: Any, **kw: Any) -> Any:
            call = BlockCall(tuple(args), dict(kw))
            if index == 0:
                first.append(call.hidden)
            calls[index].append(call.with_hidden(None))  # keep masks / rotary embeddings, not the activations
            if index == len(blocks) - 1:
                raise _Captured
            if not wrap:
                out = real(*args, **kw)
                wrap.append((lambda h: (h, *out[1:])) if isinstance(out, tuple) else (lambda h: h))
            return wrap[0](call.hidden)
        return forward

    for i, b in enumerate(blocks):
        b.forward = stand_in(i, b)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for w in windows:
                try:
                    model(input_ids=w.to(device), **({"use_cache": False} if decoder else {}))
                except _Captured:
                    pass
    finally:
        for b in blocks:
            del b.forward
    return first, calls


def _cast(call: BlockCall, dtype: torch.dtype) -> BlockCall:
    """The call with its floating-point tensors (hidden states, masks, rotary cos/sin) at `dtype`."""
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    return BlockCall(tuple(cast(a) for a in call.args), {k: cast(v) for k, v in call.kwargs.items()})


def run_block(block: nn.Module, call: BlockCall) -> torch.Tensor:
    """The block's output hidden states for one call (blocks return a tensor or a tuple led by it)."""
    out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_stats(block: nn.Module, layers: list[tuple[str, nn.Module]], calls: list[BlockCall]) -> dict[str, Any]:
    """InputStats of `layers` (name, module inside `block`) from running the block on `calls`."""
    from saten_core.calibrate import _hook

    stats: dict[str, Any] = {}
    seen: dict[int, tuple] = {}
    handles = [m.register_forward_hook(_hook(stats, name, seen)) for name, m in layers]
    try:
        with torch.no_grad():
            for call in calls:
                seen.clear()
                block(*call.args, **call.kwargs)
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    return stats


def walk(model: nn.Module, windows: list[torch.Tensor], decoder: bool,
         on_block: Callable[[int, nn.Module, dict[str, Any]], None], layer_names: set[str],
         progress: Progress | None = None, work_dtype: torch.dtype = torch.float32) -> None:
    """Call on_block(i, block, stats of its `layer_names`) for every block in order, each block's statistics taken
    on the outputs of the blocks before it as they are after their on_block (compressed).

    Only the current block is cast to `work_dtype` (fp32: compression's working precision) and back to its stored
    dtype afterwards, so a 16-bit model stays 16-bit but for one block; the hidden states are kept in work_dtype.
    """
    prefix, blocks = transformer_blocks(model)
    hidden, recorded = capture_calls(model, blocks, windows, decoder)
    for i, block in enumerate(blocks):
        stored = next(block.parameters()).dtype
        originals = byte_ranges(block.parameters())  # maybe pages of the mapped checkpoint
        block.to(work_dtype)
        calls = [_cast(call.with_hidden(h), work_dtype) for call, h in zip(recorded[i], hidden, strict=True)]
        own = f"{prefix}.{i}." if prefix else f"{i}."
        layers = [(name, m) for name, m in model.named_modules() if name in layer_names and name.startswith(own)]
        stats = block_stats(block, layers, calls) if layers else {}
        del layers  # the originals: on_block replaces them, and they must not outlive that
        on_block(i, block, stats)
        del stats
        with torch.no_grad():
            hidden = [run_block(block, c) for c in calls]
        block.to(stored)
        live = set(byte_ranges(block.parameters()))  # a cast that changed nothing keeps its tensor
        release_mapped(r for r in originals if r not in live)  # replaced or cast: their pages need not stay
        del originals
        recorded[i] = []  # this block's masks / embeddings are not needed again
        trim_heap()  # the block's statistics and fp32 copy were freed: give their heap pages back
        if progress is not None:
            progress("calibrate", (i + 1) / len(blocks), f"block {i + 1}/{len(blocks)} calibrated and compressed")


def compress_blockwise(model: nn.Module, plan: Any, windows: list[torch.Tensor], decoder: bool, *,
                       progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """compress_ with block-sequential statistics: every spec resolved first (a bad plan changes nothing), then
    each block's planned layers compressed on inputs from the compressed blocks before it. Returns the reports."""
    from saten_core.compress import Cancelled, compress_layer, planned_layers

    plan.validate()
    specs = {name: spec for name, _, spec in planned_layers(model, plan)}  # names, not modules: a compressed
    # layer's original (cast to fp32 with its block) must be freed once replaced, not kept alive by this list
    prefix, blocks = transformer_blocks(model)
    outside = [name for name in specs if not name.startswith(f"{prefix}.")]
    if outside:
        raise ValueError(f"layer {outside[0]} is outside the block list {prefix!r}: it cannot be calibrated block "
                         "by block (use the all-at-once calibration)")
    reports: list[dict] = []
    dtype = plan.torch_dtype()

    def on_block(i: int, block: nn.Module, stats: dict[str, Any]) -> None:
        own = [name for name in specs if name.startswith(f"{prefix}.{i}.")]
        for name in own:
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled after {len(reports)} of {len(specs)} layers (block {i})")
            linear = model.get_submodule(name)
            reports.append(compress_layer(model, name, linear, specs[name], stats.pop(name, None), dtype))
            del linear  # freed after
            trim_heap()  # the layer's fit temporaries and (unless shared) statistics were just freed
        if progress is not None and own:
            progress("compress", len(reports) / len(specs), f"block {i + 1}/{len(blocks)}: {len(own)} layers")

    walk(model, windows, decoder, on_block, set(specs), progress=progress)
    return reports
