"""Per-layer precision entries of a plan (ARCHITECTURE.md), without torch: plans are data."""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_DTYPES = ("int4", "int8", "fp16", "fp32")
ACTIVATION_DTYPES = ("int8", "int16", "fp16", "fp32")
# "palette": the weights are 2^bits float values of a k-means look-up table per tensor, stored as
# bits-wide indices (Core ML palettization, coremltools.optimize). Targets without look-up-table
# weights apply per_channel linear integers of the same width and say so in the lowering report.
GRANULARITIES = ("per_channel", "per_tensor", "palette")


@dataclass(frozen=True)
class LayerPrecision:
    """One entry of a plan: ``{weights, activations, granularity}``."""

    weights: str = "fp32"
    activations: str = "fp32"
    granularity: str = "per_channel"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {WEIGHT_DTYPES}, got {self.weights!r}")
        if self.activations not in ACTIVATION_DTYPES:
            raise ValueError(f"activations must be one of {ACTIVATION_DTYPES}, got {self.activations!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    def to_dict(self) -> dict[str, str]:
        return {"weights": self.weights, "activations": self.activations, "granularity": self.granularity}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> LayerPrecision:
        return cls(d["weights"], d["activations"], d.get("granularity", "per_channel"))


# The precisions of PTQ4ADM §6.1 by name. "A16" is fp16 activations (weight-only integer kernels
# with half-precision activations, as Core ML and TensorRT run W8A16 / W4A16).
PRECISIONS: dict[str, LayerPrecision] = {
    "w8a8": LayerPrecision("int8", "int8"),
    "w4a8": LayerPrecision("int4", "int8"),
    "w8a16": LayerPrecision("int8", "fp16"),
    "w4a16": LayerPrecision("int4", "fp16"),
}
