"""PTQ4ADM calibration: conditioning coverage, activation-aware sampling, sensitivity, plans.

Modules (imported explicitly; nothing is imported here, so ``import calibration`` is free):

- :mod:`calibration.quality`: Fréchet distance over log-mel frames or a user's local embedding
  model, ViSQOL when its package is installed.
- :mod:`calibration.coverage`: §5.1 Algorithm 1 (coverage-driven augmentation) for vocals and captions.
- :mod:`calibration.sampling`: §5.2 Algorithm 2 (activation-aware sampling) and ``calibrate``,
  the calibration-set verb (``add_calibrate_parser``).
- :mod:`calibration.precision`, :mod:`calibration.fakequant`: plan entries and simulated quantization.
- :mod:`calibration.sensitivity`: one-layer-at-a-time end-to-end sensitivity (``add_sensitivity_parser``).
- :mod:`calibration.plan`: presets and budgeted plan search (``add_plan_parser``).
"""
