"""A model as plain data: the op graph that placement reads (no torch objects inside).

Graph capture (quantsim.graph) turns a torch.fx trace into an OpGraph; quantsim.config.placement turns
(OpGraph, BackendConfig) into a placement. Tests build OpGraphs by hand to check placement without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Name used in OpNode.inputs for the i-th model input: f"{MODEL_INPUT}{i}".
MODEL_INPUT = "model_input:"


@dataclass(frozen=True)
class OpNode:
    """One op of the model.

    name:     unique; the module path for modules ("layer1.0.conv1"), a generated path for functional
              calls ("layer1.0.add").
    op_type:  ONNX op type name ("Conv", "Gemm", "Relu", "Add", ...), "" when quantsim does not know the op.
    inputs:   for each tensor input, the name of the node producing it, or MODEL_INPUT + index;
              None for an input that is a constant/parameter (not an activation).
    params:   names of the op's parameters that can be quantized, e.g. ("weight", "bias").
    is_model_output: the op's output is (part of) the model's output.
    depthwise: a depthwise convolution (groups == in_channels > 1); AIMET never starts a supergroup there.
    """

    name: str
    op_type: str
    inputs: tuple[str | None, ...] = ()
    params: tuple[str, ...] = ()
    is_model_output: bool = False
    depthwise: bool = False


@dataclass
class OpGraph:
    """Ops in topological order."""

    nodes: list[OpNode] = field(default_factory=list)

    def __post_init__(self):
        self._by_name = {n.name: n for n in self.nodes}
        if len(self._by_name) != len(self.nodes):
            raise ValueError("OpGraph node names must be unique")
        self._consumers: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None and i in self._consumers:
                    self._consumers[i].append(n.name)

    def __getitem__(self, name: str) -> OpNode:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self):
        return len(self.nodes)

    def consumers(self, name: str) -> list[str]:
        """Names of the nodes that read `name`'s output (one entry per use)."""
        return self._consumers[name]

    def model_input_consumers(self, index: int) -> list[str]:
        key = f"{MODEL_INPUT}{index}"
        return [n.name for n in self.nodes for i in n.inputs if i == key]
