"""The interface every inference backend implements, and input checking.

An engine runs exactly one streaming step of ``FusionNet``: named numpy arrays
in, named numpy arrays out, batch 1, no hidden state. Shapes and dtypes are
checked here, before anything reaches a compiled engine, so that a wrong input
fails with a message naming the tensor instead of a backend-specific crash.
"""

from __future__ import annotations

import abc

import numpy as np

from ..model import TensorSpec


class InputError(ValueError):
    """An engine input has the wrong name, shape or dtype."""


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray]) -> None:
    expected = {s.name for s in specs}
    missing = sorted(expected - set(inputs))
    extra = sorted(set(inputs) - expected)
    if missing or extra:
        raise InputError(f"engine inputs must be exactly {sorted(expected)}; missing {missing}, unexpected {extra}")
    for spec in specs:
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise InputError(f"input '{spec.name}' must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(spec.dtype):
            raise InputError(f"input '{spec.name}' must have dtype {spec.dtype}, got {value.dtype} "
                             f"(expected {spec.describe()})")
        if tuple(value.shape) != spec.shape:
            raise InputError(f"input '{spec.name}' must have shape {list(spec.shape)}, got {list(value.shape)}")


class Engine(abc.ABC):
    """One stateless streaming step. Subclasses set ``name`` and implement ``run``."""

    name: str = "engine"

    def __init__(self, input_specs: tuple[TensorSpec, ...], output_specs: tuple[TensorSpec, ...]):
        self.input_specs = input_specs
        self.output_specs = output_specs

    def step(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(self.input_specs, inputs)
        return self.run(inputs)

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute one step on already checked inputs."""

    def describe(self) -> str:
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""

    def status(self) -> tuple[int, str, dict[str, str]] | None:
        """The engine's own diagnostics since the last call, as (level, message, values), or None.

        The Runtime reports it on /diagnostics as "mm_fusion: engine" (the remote engine's round-trip
        time and misses); an in-process engine has nothing to add beyond the cadence.
        """
        return None
