"""The one recorder of the target's layer outputs that the standalone drafter reads, in training and in decoding.

Forward hooks on the target's decoder layers record their outputs while the tap is :attr:`~FeatureTap.active`
(no ``output_hidden_states``: only the tapped layers are kept). One tap per model (:meth:`FeatureTap.of`),
installed once and kept: a compiled decoder traces the hooks when it compiles (dynamo does not notice hooks added
later), so the tap must be there before the first compiled forward (``run_eval`` installs it before building the
static cache). Off, a hook returns at once; a compiled decoder keeps one graph per setting of the flag.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import torch
from torch import nn

from ...families import decoder
from ...speculative.engine import unwrap_model


class FeatureTap:
    """Forward hooks on ``model``'s decoder layers; :meth:`take` returns the last forward's features."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder(model).layers
        self.active = False
        self.out: dict[int, torch.Tensor] = {}
        self.handles: dict[int, object] = {}

    @classmethod
    def of(cls, model: nn.Module, layer_ids: Sequence[int] = ()) -> "FeatureTap":
        """The model's tap (made on first use), hooked on at least ``layer_ids``."""
        model = unwrap_model(model)
        tap = _TAPS.get(model)
        if tap is None:
            # kept beside the model, not on it: a deep copy of the model gets a tap of its own (its layers carry the
            # original's hooks, off unless the original decodes), state_dict and named_modules stay unchanged
            tap = _TAPS[model] = cls(model)
        for i in layer_ids:
            if int(i) not in tap.handles:
                tap.handles[int(i)] = tap.layers[int(i)].register_forward_hook(tap._hook(int(i)))
        return tap

    def _hook(self, i: int):
        def hook(_module, _args, output):
            if self.active:
                self.out[i] = output[0] if isinstance(output, tuple) else output
        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator["FeatureTap"]:
        """On for the block (what an earlier recording left is forgotten), off again after it."""
        self.out.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self, layer_ids: Sequence[int]) -> torch.Tensor:
        """``[b, q, K*H]``: the last forward's features of ``layer_ids``, concatenated in that order (a new tensor:
        safe to keep past the next forward, also a CUDA graph's); forgets them."""
        try:
            feats = torch.cat([self.out[i] for i in layer_ids], dim=-1)
        except KeyError as exc:
            raise RuntimeError(f"no features of target layer {exc.args[0]} were recorded: the target's decoder was "
                               "compiled before this tap was installed (a compiled graph does not see hooks added "
                               "later); install it first (FeatureTap.of(model, layer_ids)), or torch._dynamo.reset()"
                               ) from None
        self.out.clear()
        return feats

    def remove(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()


_TAPS: "weakref.WeakKeyDictionary[nn.Module, FeatureTap]" = weakref.WeakKeyDictionary()


__all__ = ["FeatureTap"]
