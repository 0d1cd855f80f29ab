"""How `compile_fp8` compiles a converted model: regionally where the model repeats blocks.

Compiling the whole model of a transformer traces every block: the first step of a 16-block
LM spends most of a minute in the compiler. Its blocks are the same code on parameters of the
same shapes, so compiling each block in place (`nn.Module.compile`) lets dynamo trace the
block's class once and reuse that graph for every other block. The embedding, the final norm,
the head and a loss computed in the model's forward run eagerly unless the user compiles them:
as one function from the last hidden state to the loss, so that the logits stay inside one graph
(compiled apart from the head, a loss keeps the eager logits alive as its graph's input).

`compile_regions(model, how, kwargs)`:
    how=True      each repeated block (a child of an nn.ModuleList / nn.Sequential whose class
                  occurs more than once there and that holds converted layers; the outermost
                  such blocks) compiled in place; a model without such blocks compiled whole
    how="model"   the whole model compiled in place
    how=False     nothing compiled

Always in place: the model object, its class, methods and state_dict keys stay what they were.

All blocks share one code object, and dynamo keeps at most `recompile_limit` graphs (8) per code
object before it runs the rest eagerly, silently. A block that dynamo specialises per instance
(an HF decoder layer indexes its KV cache with its int `layer_idx` during `generate`) needs one
graph per block, so the limit is raised to the number of blocks plus the default.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Union

import torch
from torch import nn

from .layers import ConvertedLayer, is_linear_like, layer_state

logger = logging.getLogger("compile_fp8")
CompileChoice = Union[bool, str]
COMPILE_CHOICES = (True, False, "model")


def check_compile_choice(how) -> None:
    if not (how is True or how is False or how == "model"):
        raise ValueError(f"compile={how!r} is not supported; allowed values: {list(COMPILE_CHOICES)}")


def compile_regions(model: nn.Module, how: CompileChoice, kwargs: dict, block_kwargs: dict | None = None) -> list[str]:
    """Compile `model` in place as `how` says; returns the fqns compiled ("" is the model).
    `block_kwargs`: the repeated blocks' compile kwargs where they differ from `kwargs`."""
    if how is False:
        return []
    blocks = repeated_blocks(model) if how is True else []
    if not blocks:
        compile_in_place(model, kwargs)
        logger.info("compile_fp8: compiled the whole model (%s)", type(model).__name__)
        return [""]
    for _, block in blocks:
        compile_in_place(block, kwargs if block_kwargs is None else block_kwargs)
    _allow_a_graph_per_block(len(blocks))
    names = [fqn for fqn, _ in blocks]
    classes = sorted({type(block).__name__ for _, block in blocks})
    logger.info("compile_fp8: compiled %d repeated block(s) of %s in place (%s); the rest runs eagerly",
                len(names), ", ".join(classes), _span(names))  # fmt: skip
    return names


def compile_in_place(module: nn.Module, kwargs: dict) -> None:
    """`module.compile(**kwargs)`, made to work for torch's own classes too.

    `nn.Module.compile` compiles the module's `_call_impl`, a frame in dynamo's skip list, so
    dynamo captures the first frame below it that is not: a user class's `forward` (what we
    want), but for a class of torch.nn itself (an nn.Sequential model) only the frames of
    whatever it calls. Those get a call from a frame of ours, as `torch.compile(module)` does."""
    if not _skipped_by_dynamo(type(module).forward):
        module.compile(**kwargs)
        return

    def call(*args, **kwargs_):
        return module._call_impl(*args, **kwargs_)

    module._compiled_call_impl = torch.compile(call, **kwargs)


def _skipped_by_dynamo(fn) -> bool:
    try:
        from torch._dynamo import trace_rules

        return bool(trace_rules.check(fn))
    except (ImportError, AttributeError):  # another torch: the call from our frame works for any module
        return True


def _allow_a_graph_per_block(blocks: int) -> None:
    config = torch._dynamo.config
    needed = blocks + 8
    if config.recompile_limit < needed:
        logger.info("compile_fp8: torch._dynamo.config.recompile_limit %d -> %d (%d compiled blocks)",
                    config.recompile_limit, needed, blocks)  # fmt: skip
        config.recompile_limit = needed


def repeated_blocks(model: nn.Module, before_conversion: bool = False) -> list[tuple[str, nn.Module]]:
    """(fqn, block) of the outermost repeated blocks that hold converted layers (or, with
    `before_conversion`, linear-like layers: the blocks conversion would make)."""
    holds = _holds_linear if before_conversion else _holds_converted
    found: list[tuple[str, nn.Module]] = []
    for fqn, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or _inside(fqn, found):
            continue
        counts = Counter(type(child) for child in container.children())
        for name, child in container.named_children():
            if counts[type(child)] > 1 and not is_linear_like(child) and holds(child):
                found.append((f"{fqn}.{name}".lstrip("."), child))
    return found


def _inside(fqn: str, blocks: list[tuple[str, nn.Module]]) -> bool:
    return any(fqn == b or fqn.startswith(b + ".") for b, _ in blocks if b)


def _holds_converted(module: nn.Module) -> bool:
    return any(isinstance(layer_state(m), ConvertedLayer) for m in module.modules())


def _holds_linear(module: nn.Module) -> bool:
    return any(is_linear_like(m) for m in module.modules())


def _span(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
