"""Accuracy-aware plan search driven by neural-compressor's tuning loop (``toolkit plan --search autotune``).

INC 3.x's ``autotune(model, TuningConfig(config_set, tolerable_loss, max_trials), eval_fn)``
scores the float model (the baseline), then takes the configs of the set in order: quantizes a copy
of the model with the config's registered algorithm, scores it, and stops at the first trial whose
score is at least baseline · (1 − tolerable_loss), or after ``max_trials`` (then it returns the best
trial). Here INC's loop and stopping rule do the search over the project's own plan space:

- the project's plan is registered as an INC config and algorithm (``ADMPlanConfig``, algorithm
  ``"adm_plan"``) with one tunable parameter, ``candidate``; ``ADMPlanConfig(candidate=[0, 1, ...])``
  is expanded by INC itself into one trial per candidate plan;
- the algorithm applies candidate i: a fake-quantized copy of the denoiser
  (:func:`calibration.fakequant.quantized_copy`, activation ranges from the calibration set, the
  plan's rounding is RTN);
- ``eval_fn`` is the project's paired metric: the mean latent SNR (dB) of DDIM sampling of the
  first ``n_eval`` conditioning examples of the calibration set with their stored noise, against the
  full-precision model, capped at :data:`SCORE_CAP_DB` (positive, higher is better; float scores
  the cap);
- ``tolerable_loss = 1 − min_snr_db / SCORE_CAP_DB``: INC's relative rule is then the SNR target.

The candidates: every layer at the preset, then the k most fragile layers raised to fp16
(:data:`calibration.plan.HIGH_PRECISION`) for k in :data:`RAISE_STEPS`; fragility is the measured
one-layer latent-SNR loss at the preset when a sensitivity table is given, else the layer's
relative output error ‖WX − Ŵ X‖² / ‖WX‖² under round-to-nearest at the preset's weight width, from
the calibration inputs' Hessians (:mod:`calibration.gptq`; a proxy: it ignores how an error
propagates to the output). Candidates over the size budget are not offered, and bytes grow along
the set, so the first trial INC accepts is the smallest offered plan that meets the target.

Where INC's loop does not fit (so it is said here, not hidden): it knows nothing of bytes (the budget
filters the set before INC sees it); its rule stops at the first passing trial, so the candidate
order *is* the search strategy (written here, not INC's); its own algorithms are not used (its
weight-only RTN/GPTQ/AWQ quantize ``nn.Linear`` only, and GPTQ/AWQ failed on this model family; see
:mod:`calibration.gptq`); and registering a config and algorithm mutates INC's global registries (done
once, on first use, never at import).
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

ALGO_NAME = "adm_plan"
SCORE_CAP_DB = 100.0  # the score of a plan that changes nothing (and of the float baseline)
RAISE_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_REGISTERED: dict = {}


def _inc():
    """Import neural-compressor and register the plan config and algorithm (once)."""
    if _REGISTERED:
        return _REGISTERED
    try:
        import torch
        from neural_compressor.common.base_config import register_config
        from neural_compressor.common.utils import DEFAULT_WHITE_LIST
        from neural_compressor.torch.quantization import TuningConfig, autotune
        from neural_compressor.torch.quantization.config import TorchBaseConfig
        from neural_compressor.torch.utils import register_algo
    except ImportError as exc:
        raise ValueError(f"--search autotune needs neural-compressor and the packages it imports ({exc}); "
                         "pip install neural-compressor psutil py-cpuinfo accelerate prettytable pydantic") from None

    @register_config(framework_name="torch", algo_name=ALGO_NAME, priority=0)
    class ADMPlanConfig(TorchBaseConfig):
        """One candidate plan of the current search, by index (INC expands a list of indices)."""

        name = ALGO_NAME
        supported_configs: list = []

        # INC rebuilds a config from every instance attribute, its own bookkeeping included
        # (params_list, non_tunable_params); those come back as keywords and are dropped here (INC
        # leaves a parameter named "kwargs" out of the tunable ones).
        def __init__(self, candidate: int = 0, white_list=DEFAULT_WHITE_LIST, **kwargs):
            super().__init__(white_list=white_list)
            self.candidate = candidate
            self._post_init()

        @classmethod
        def register_supported_configs(cls):
            cls.supported_configs = []

        @staticmethod
        def get_model_info(model):
            from calibration.fakequant import quantizable_leaves

            return [(name, type(m).__name__) for name, m in quantizable_leaves(model).items()]

        @classmethod
        def get_config_set_for_tuning(cls):
            return cls(candidate=[0])

    @register_algo(ALGO_NAME)
    @torch.no_grad()
    def adm_plan_entry(model, configs_mapping, mode=None, *args, run_args=None, **kwargs):
        search = run_args[0]
        configs = {c.candidate for c in configs_mapping.values() if getattr(c, "name", None) == ALGO_NAME}
        if len(configs) != 1:
            raise RuntimeError(f"one plan candidate per trial expected, got {sorted(configs)}")
        return search.apply(model, configs.pop())

    _REGISTERED.update(config=ADMPlanConfig, autotune=autotune, TuningConfig=TuningConfig)
    return _REGISTERED


@dataclass
class _Search:
    """What one trial needs: the candidate plans, activation ranges, the evaluation set."""

    candidates: list
    ranges: dict
    cond: object
    noise: object
    steps: int
    guidance: float
    pipeline: object
    reference: object = None
    trials: list | None = None

    def apply(self, model, index: int):
        from calibration.fakequant import quantized_copy

        q = quantized_copy(model, {n: p for n, p in self.candidates[index].items()
                                   if not (p.weights == "fp32" and p.activations == "fp32")}, self.ranges)
        q.adm_candidate = index  # which plan INC returns
        return q

    def latents(self, denoiser):
        import dataclasses

        import torch

        from toolkit.generate import sample_latent

        with torch.no_grad():
            pipe = dataclasses.replace(self.pipeline, denoiser=denoiser)
            return sample_latent(pipe, self.cond, self.noise, steps=self.steps, guidance=self.guidance).numpy()

    def score(self, denoiser) -> float:
        """Mean latent SNR (dB) against full precision over the evaluation examples, capped."""
        from runtime_py.metrics import snr_db

        if self.reference is None:
            self.reference = self.latents(self.pipeline.denoiser)
        got = self.latents(denoiser)
        snr = float(sum(min(snr_db(r, g), SCORE_CAP_DB) for r, g in zip(self.reference, got)) / len(got))
        index = getattr(denoiser, "adm_candidate", None)
        self.trials.append({"candidate": index, "latent_snr_db": snr})
        return snr


def fragility_order(pipeline, preset: str, calib_dir: Path, sensitivity: dict | None) -> tuple[list[str], str]:
    """Layers, most fragile first, and how that was decided (see the module doc)."""
    from calibration.fakequant import quantizable_leaves
    from calibration.plan import PRESETS, layer_loss

    layers = list(quantizable_leaves(pipeline.denoiser))
    base = PRESETS[preset]
    if sensitivity is not None:
        loss = {n: layer_loss(n, base, sensitivity) for n in layers}
        return sorted(layers, key=lambda n: (-loss[n], layers.index(n))), "measured one-layer latent-SNR loss"
    from calibration.feeds import calibration_feeds
    from calibration.gptq import round_layers

    feeds = calibration_feeds(pipeline, Path(calib_dir), "denoiser")
    _, figures = round_layers(pipeline.denoiser, feeds, {n: base for n in layers}, method="rtn")
    error = {n: figures[n][base.weights]["relative_output_error_rtn"] for n in layers}
    return (sorted(layers, key=lambda n: (-error[n], layers.index(n))),
            "relative layer output error under RTN (Hessian of the calibration inputs)")


def autotune_plan(pipeline, preset: str, calib_dir: Path, *, budget: float | None, sensitivity: dict | None,
                  sensitivity_source: str | None, min_snr_db: float, max_trials: int, n_eval: int,
                  vae_decoder_layers: list[str] | None) -> dict:
    """The plan INC's tuning loop picks (see the module doc), as plan JSON with the search recorded."""
    import torch

    from calibration.fakequant import activation_ranges
    from calibration.plan import HIGH_PRECISION, PRESETS, make_plan, planned_bytes
    from calibration.sampling import load_calibration_set
    from calibration.sensitivity import layer_sizes

    if not 0 < min_snr_db < SCORE_CAP_DB:
        raise ValueError(f"--min-snr-db must lie in (0, {SCORE_CAP_DB}) for autotune, got {min_snr_db}")
    inc = _inc()
    t0 = time.time()
    sizes, fp32_bytes = layer_sizes(pipeline.denoiser)
    order, order_source = fragility_order(pipeline, preset, calib_dir, sensitivity)
    base = PRESETS[preset]
    candidates, raised = [], []
    for k in RAISE_STEPS:
        if k > len(order):
            break
        assign = {n: (HIGH_PRECISION if n in order[:k] else base) for n in sizes}
        if budget is not None and planned_bytes(assign, sizes, fp32_bytes) > budget * fp32_bytes + 1e-9:
            break  # bytes only grow from here
        candidates.append(assign)
        raised.append(k)
    if not candidates:
        raise ValueError(f"even the {preset} preset on every layer is over the budget size={budget}; "
                         "choose a lower preset or a larger budget")

    calib = load_calibration_set(Path(calib_dir))
    n_eval = min(n_eval, calib.conditioning.shape[0])
    ranges = activation_ranges(pipeline.denoiser, calib) if base.activations in ("int8", "int16") else None
    search = _Search(candidates=candidates, ranges=ranges, cond=calib.conditioning[:n_eval],
                     noise=calib.noise[:n_eval], steps=int(calib.manifest["steps"]),
                     guidance=float(calib.manifest["guidance"]), pipeline=pipeline, trials=[])
    tolerable_loss = 1.0 - min_snr_db / SCORE_CAP_DB
    tuning = inc["TuningConfig"](config_set=[inc["config"](candidate=list(range(len(candidates))))],
                                 tolerable_loss=tolerable_loss, max_trials=max(1, min(max_trials, len(candidates))))
    with torch.no_grad():
        best = inc["autotune"](pipeline.denoiser.eval(), tuning, eval_fn=search.score,
                               run_fn=lambda model, *args: None, run_args=(search,))
    if best is None:
        raise RuntimeError("neural-compressor's autotune returned no model")
    chosen = int(best.adm_candidate)
    trials = [t for t in search.trials if t["candidate"] is not None]
    met = any(t["candidate"] == chosen and t["latent_snr_db"] >= min_snr_db for t in trials)

    plan = make_plan(preset, sizes, fp32_bytes, budget=None, sensitivity=None, model=pipeline.config.name,
                     min_snr_db=min_snr_db, vae_decoder_layers=vae_decoder_layers)
    assign = candidates[chosen]
    total = planned_bytes(assign, sizes, fp32_bytes)
    plan["overrides"] = {n: p.to_dict() for n, p in assign.items() if p != base}
    plan["layers"] = {n: {**assign[n].to_dict(), "weight_params": sizes[n]["weight_params"]} for n in sizes}
    plan["kept_high_patterns"] = []
    plan["budget"] = {"size": budget, "fp32_bytes": int(fp32_bytes), "planned_bytes": int(round(total)),
                      "size_ratio": total / fp32_bytes,
                      "met": None if budget is None else bool(total <= budget * fp32_bytes + 1e-9)}
    from importlib.metadata import version

    plan["search"] = {
        "method": "neural-compressor autotune over the project's plan candidates",
        "neural_compressor_version": version("neural-compressor"),
        "min_snr_db": min_snr_db, "predicted_latent_snr_db": None,
        "score": f"mean latent SNR over {n_eval} calibration examples, capped at {SCORE_CAP_DB} dB",
        "tolerable_loss": tolerable_loss, "max_trials": tuning.max_trials,
        "order": order_source, "fragile_first": order[:max(raised)],
        "candidates": [{"raised_to_fp16": k, "size_ratio": planned_bytes(c, sizes, fp32_bytes) / fp32_bytes}
                       for k, c in zip(raised, candidates)],
        "trials": trials, "chosen": chosen, "target_met": met,
        "sensitivity_source": sensitivity_source, "seconds": round(time.time() - t0, 2),
        "moves": [{"layer": n, "from": base.to_dict(), "to": HIGH_PRECISION.to_dict(),
                   "why": f"autotune: raised among the {raised[chosen]} most fragile"} for n in order[:raised[chosen]]],
    }
    json.dumps(plan)  # JSON-ready, or fail here rather than half-way through writing
    if not math.isfinite(plan["budget"]["size_ratio"]):
        raise RuntimeError("non-finite plan size")
    return plan
