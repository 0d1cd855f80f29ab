"""What the graph passes share: reading the values dynamo recorded on fx nodes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx


def value_of(node) -> Optional[torch.Tensor]:
    """The fake tensor dynamo recorded for `node` (None when it is not a node or has none)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None
