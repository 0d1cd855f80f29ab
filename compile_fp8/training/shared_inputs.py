"""Layers that read the same tensor share one input scale, so they share one float8 copy.

A SwiGLU block feeds one tensor, the normalized hidden state, to two linears (`gate` and `up`);
attention with separate q/k/v projections feeds one tensor to three. With dynamic scaling each
layer computes `amax(x)` of that same tensor; the compiler sees the same computation on the same
input, merges it (CSE), and the cast `x -> float8` happens once. With static scaling each layer
reads its *own* calibrated amax buffer: the values are equal (the same tensor was measured), but
the compiler cannot know that, so it casts `x` once per layer, and keeps one float8 copy per
layer for the weight gradients (on the 956M LM: one more [16384, 2048] float8 tensor per
block, +0.5 GiB at peak, and one more cast kernel each way). Delayed scaling is alike: each
layer's own history holds the same numbers, in another buffer.

So `calibrate` watches which static or delayed layers receive the very same tensor object
(`is`, not equal values) in every calibration forward. The first layer to receive it leads;
each later one is tied to it (`TrainingState.input_scale_from`) when their recorded input
amaxes are equal, and its forward then reads the leader's buffer. Both buffers keep their (equal) values, so
a checkpoint holds every layer's scale as before; ties are not stored: after loading a
checkpoint without calibrating again, each layer reads its own buffer (the same scales, one
float8 copy per layer).

A static tie changes no value: static input amaxes stay fixed after calibration, so the
leader's buffer holds exactly the follower's number whatever the training forward later feeds
them (tests/test_shared_inputs.py checks the same bits).

A delayed history moves: each training forward pushes the amax of what its layer read. Tied
delayed layers read the leader's history, so it must not move between their reads: the leader
does not push its own input history; the tied layer called last in the calibration forwards
(`TrainingState.input_pushed_by`) pushes it, after every reader, with the amax of the shared
tensor. Each follower still pushes its own history (nobody reads it while tied; it keeps the
same numbers as the leader's, for a checkpoint). So a delayed tie assumes what calibration saw
holds in training too: the layers read one tensor in every forward (a model's structure, as in
a SwiGLU or a q/k/v projection). A model that feeds a tied layer another tensor later would cast
it with the leader's scale: calibrate such a model with static or dynamic scaling instead.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

_UNSEEN = object()


class InputTies:
    """What one `calibrate` call saw: for each layer, the layer that received the same input
    object before it in every forward (or None once any forward disagreed)."""

    def __init__(self):
        self._recent: list[tuple[weakref.ref, weakref.ref]] = []  # (layer, its input), in call order
        self._leader: "weakref.WeakKeyDictionary[nn.Module, Optional[nn.Module]]" = weakref.WeakKeyDictionary()
        self._order: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
        self._calls = 0

    def record(self, module: nn.Module, input: torch.Tensor) -> None:
        """`module` is about to read `input` (a calibration forward)."""
        self._recent = [(m, x) for m, x in self._recent if x() is not None]  # inputs still alive
        leader = next((m() for m, x in self._recent if x() is input and m() is not module), None)
        before = self._leader.get(module, _UNSEEN)
        self._leader[module] = leader if before is _UNSEEN or before is leader else None
        self._recent.append((weakref.ref(module), weakref.ref(input)))
        self._order[module] = self._calls  # its latest read, in call order
        self._calls += 1

    def called_later(self, first: nn.Module, second: nn.Module) -> bool:
        """`second` read its input after `first` did (in the latest forward that both ran)."""
        return self._order.get(second, -1) > self._order.get(first, -1)

    def pop_leader(self, module: nn.Module) -> Optional[nn.Module]:
        """The layer `module` received its input from in every forward, if any; forgets it."""
        return self._leader.pop(module, None)


_ties = InputTies()


def begin() -> None:
    """A `calibrate` call starts: forget what earlier calls saw (a tensor that an earlier call,
    maybe of another model, fed to some layer must not tie this call's layers to that one)."""
    global _ties
    _ties = InputTies()


def record_input(module: nn.Module, input: torch.Tensor) -> None:
    _ties.record(module, input)


def called_later(first: nn.Module, second: nn.Module) -> bool:
    return _ties.called_later(first, second)


def tied_leader(module: nn.Module, amax_name: str) -> Optional[nn.Module]:
    """After calibration: the layer whose `amax_name` buffer `module` can read instead of its own
    (it saw the same inputs, so it recorded the same amax), or None."""
    leader = _ties.pop_leader(module)
    if leader is None or not torch.equal(getattr(leader, amax_name), getattr(module, amax_name)):
        return None
    return leader
