"""Memory and time budgets for the gradient methods.

* :func:`checkpointed_blocks` recomputes each transformer block in the backward pass
  (``torch.utils.checkpoint``) instead of keeping its activations: the backward then holds
  one ``[batch, pos, d_model]`` input per block plus one block's activations, not every
  block's ``[batch, head, pos, pos]`` attention pattern, for about one extra forward pass.
* :func:`saved_bytes` measures what one forward pass saves for its backward (the tensors
  autograd keeps, parameters excepted), so integrated gradients can size its internal batch
  from a memory budget on any device.
* :class:`TimeEstimate` times the first batch of integration steps and warns, once, when the
  whole run will be long.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..warn import warn

SLOW_SECONDS = 60.0  # integrated gradients says how long it will take beyond this
_KV_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: int | float | str) -> int:
    """A memory size in bytes from a number of bytes or a string such as ``"2GB"``, ``"512 MiB"``.

    Example:
        >>> parse_bytes("1.5GB"), parse_bytes("2 GiB"), parse_bytes(1024)
        (1500000000, 2147483648, 1024)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"max_memory must be bytes or a size such as '2GB' or '512MiB', got {value!r}.")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}.")
    return size


@contextmanager
def checkpointed_blocks(model, enabled: bool = True, block_hooks: Sequence[tuple[str, Callable]] = ()):
    """Within the block, every ``model.blocks[i]`` forward is gradient-checkpointed.

    ``block_hooks`` are ``(hook name, fn(act, hook))`` pairs inside the blocks: they are
    attached for each run of their block, the recomputation in the backward pass included
    (hooks added by ``run_with_hooks`` are gone by then). Without ``enabled`` (or without
    ``model.blocks``) nothing changes.

    Example:
        >>> with checkpointed_blocks(model):                      # doctest: +SKIP
        ...     model(tokens)[0, -1, 42].backward()
    """
    blocks = list(getattr(model, "blocks", [])) if enabled else []
    for index, block in enumerate(blocks):
        inside = [(name, fn) for name, fn in block_hooks if name.startswith(f"blocks.{index}.")]
        run = partial(_with_hooks, type(block).forward.__get__(block), [(model.hook_dict[n], fn) for n, fn in inside])
        # object.__setattr__: a TransformerBridge block forwards attribute writes to the wrapped HF module
        object.__setattr__(block, "forward", partial(_checkpoint, run))
    try:
        yield
    finally:
        for block in blocks:
            object.__delattr__(block, "forward")  # the instance attribute; the class's forward shows again


def _with_hooks(forward: Callable, hooks: list, *args, **kwargs):
    handles = [point.register_forward_hook(partial(_as_tl_hook, fn)) for point, fn in hooks]
    try:
        return forward(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _as_tl_hook(fn: Callable, module, inputs, output):
    return fn(output, hook=module)


def _checkpoint(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # an HF layer (inside a TransformerBridge) appends to the KV cache it is given: a recomputation
    # would append again, so the layer gets none (nothing here reads the cache)
    args = tuple(None if _is_kv_cache(value) else value for value in args)
    kwargs = {key: None if key in _KV_CACHE_ARGS or _is_kv_cache(value) else value for key, value in kwargs.items()}
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _is_kv_cache(value) -> bool:
    return any(cls.__name__ == "Cache" and cls.__module__.startswith("transformers") for cls in type(value).__mro__)


def saved_bytes(forward: Callable[[Tensor], Tensor], embeds: Tensor, model) -> int:
    """Bytes that autograd saves for the backward pass of ``forward(embeds)``, parameters excepted.

    Counted by a ``saved_tensors_hooks`` pack hook, one count per storage; the forward's
    graph is dropped at once.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> saved_bytes(lambda x: lin(x).relu().sum(), torch.ones(8, 4, requires_grad=True), lin)
        256
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    probe = embeds.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward(probe)
    del out, probe
    return sum(seen.values())


def steps_for_budget(per_step: int, budget: int, n_steps: int) -> int:
    """Integration steps per pass that keep the saved activations within ``budget`` (at least 1).

    Example:
        >>> steps_for_budget(per_step=300, budget=1000, n_steps=50), steps_for_budget(2000, 1000, 50)
        (3, 1)
    """
    steps = max(1, min(n_steps, budget // max(per_step, 1)))
    if per_step > budget:
        warn(f"One integration step saves {per_step / 1e9:.2f} GB for its backward pass, more than max_memory="
             f"{budget / 1e9:.2f} GB; running one step per pass. Pass checkpoint=True, fewer sequences per batch "
             "or shorter inputs to fit the budget.")
    return steps


class TimeEstimate:
    """Wraps a forward function; after the first of ``passes`` passes it estimates the total
    run time and warns once when it exceeds ``limit`` seconds (:data:`SLOW_SECONDS` by default).

    Example:
        >>> timed = TimeEstimate(lambda x: x, passes=1)
        >>> timed(torch.ones(1)), timed.estimate is None
        (tensor([1.]), True)
    """

    def __init__(self, forward: Callable[[Tensor], Tensor], passes: int, limit: float | None = None, what: str = "Integrated gradients"):
        self.forward, self.passes, self.what = forward, passes, what
        self.limit = SLOW_SECONDS if limit is None else limit  # read now, so it can be changed
        self.calls, self.started, self.estimate = 0, 0.0, None

    def __call__(self, embeds: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 1:
            self.started = time.perf_counter()
        elif self.calls == 2 and self.passes > 1:  # the first pass's forward and backward are done
            per_pass = time.perf_counter() - self.started
            self.estimate = per_pass * self.passes
            if self.estimate > self.limit:
                warn(f"{self.what} will take about {self.estimate:.0f} s: {self.passes} passes of {per_pass:.1f} s. "
                     "Lower n_steps, shorten the inputs, or raise max_memory / internal_batch_size for fewer passes.")
        return self.forward(embeds)


def n_passes(n_steps: int, batch: int, internal_batch_size: int) -> int:
    """How many passes captum makes for ``n_steps`` steps of ``batch`` sequences.

    Example:
        >>> n_passes(50, 2, 8)
        13
    """
    return math.ceil(n_steps / max(1, internal_batch_size // batch))
