"""Why ``toolkit export`` refuses a bundle (light: the CLI imports these before torch)."""


class ParityError(RuntimeError):
    """A component's output on its target runtime is too far from PyTorch's."""


class QualityBudgetError(RuntimeError):
    """A quantized bundle already breaks its quality budget on the host."""
