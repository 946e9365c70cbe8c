"""``toolkit run``: the main job on a checkpoint (default: the embedded demo), end to end.

Stages, each printed with its progress and duration:

1. reference: a labelled synthetic vocal, its accompaniment generated at full precision, and its
   musical agreement with the labels;
2. calibration set (PTQ4ADM, :func:`calibration.sampling.calibrate`) on synthetic pairs
   (:func:`toolkit.data.synth.write_synth_dataset`);
3. per-layer sensitivity (:func:`calibration.sensitivity.sensitivity`) at W8A8;
4. a plan (:func:`calibration.plan.make_plan` with the sensitivity table): starting from
   ``calibration.plan.DEFAULT_MIN_SNR_DB``, the quantized bundles are exported and judged on this
   host; while one breaks its quality budget the predicted-SNR target rises by ``PLAN_SNR_STEP_DB``
   (the worst layers move up a rung), so the plan is chosen by measurement, not by a preset;
5. fp32 and quantized bundles for every target (:func:`toolkit.bundle.export_bundle`);
6. ``runtime_py verify`` of each bundle in its own process (the native runner for ExecuTorch where
   it is built; targets whose runtime cannot run here report ``unavailable`` with the reason);
7. ``report.html`` (:mod:`toolkit.report_html`) with the matrix, a listening section, the lowering
   summaries and the musical agreement; ``matrix/`` (markdown and plots) beside it.

The calibration set and the sensitivity table live in a cache folder (default ``<out>/../.cache``)
under a key of their inputs (the denoiser's and VAE's content digests, steps, guidance, the
synthetic data's settings, size, strategy, seed), so a second run reuses them; the sensitivity
table itself records its inputs and resumes. ``out`` is refused when it exists unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from toolkit.checkpoint import load_checkpoint
from toolkit.data.music import beat_alignment, chord_agreement, tempo_agreement
from toolkit.data.synth import synth_pair_at_rate

CALIB_TRACKS = 8  # synthetic vocals behind the calibration set (coverage augmentation adds more)
CALIB_DATA_SEED = 7000  # differs from the demo's training (0) and held-out (1000) data seeds
CALIB_SIZE = 64  # intermediates K
SENSITIVITY_PRECISIONS = ("w8a8",)
SENSITIVITY_EXAMPLES = 2
PLAN_PRESET = "w8a8"
PLAN_SNR_STEP_DB = 6.0  # how much the predicted-SNR target rises after a measured failure
PLAN_MAX_ATTEMPTS = 4
LISTEN_EXAMPLE, LISTEN_SEED_INDEX = 0, 0  # the reference vocal and noise the listening section uses


class Stages:
    """Numbered stage lines with durations: ``[3/7] sensitivity ... done in 42 s``."""

    def __init__(self, total: int, log):
        self.total, self.log, self.k, self.durations = total, log, 0, {}

    def start(self, name: str, what: str = "") -> None:
        self.k += 1
        self.name, self.t0 = name, time.time()
        self.log(f"[{self.k}/{self.total}] {name}" + (f": {what}" if what else "") + " ...")

    def done(self, note: str = "") -> None:
        s = time.time() - self.t0
        self.durations[self.name] = round(s, 1)
        self.log(f"[{self.k}/{self.total}] {self.name} done in {s:.0f} s" + (f" ({note})" if note else ""))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_checkpoint(pipe) -> str:
    c = pipe.config
    prov = c.provenance or {}
    what = (f"distilled student ({prov.get('student_steps', c.default_steps)} steps, "
            f"{'guidance folded: one denoiser call per step' if c.guidance_folded else 'CFG: two calls per step'}, "
            f"{prov.get('weighting', '?')} weighting, from a {prov.get('rounds', '?')}-round run)"
            if prov.get("distilled_with") else
            f"{c.default_steps}-step model, {'guidance folded' if c.guidance_folded else 'CFG: two calls per step'}")
    return f"{pipe.path} ({c.name}: {what})"


def _agreement(audio: np.ndarray, sample_rate: int, labels: dict) -> dict:
    try:
        chords = chord_agreement(audio, sample_rate, labels)
    except ValueError as exc:  # a segment shorter than the synthesizer's shortest labelled pair
        return {"chord_accuracy": None, "chord_cosine": None, "key_correct_or_relative": None,
                "predicted_chords": None, "tempo_match": None, "beat_alignment": None, "not_scored": str(exc)}
    return {"chord_accuracy": chords["chord_accuracy"], "chord_cosine": chords["chord_cosine"],
            "key_correct_or_relative": chords.get("key_correct_or_relative"),
            "predicted_chords": chords["predicted_chords"],
            "tempo_match": tempo_agreement(audio, sample_rate, labels)["tempo_match"],
            "beat_alignment": beat_alignment(audio, sample_rate, labels)}


def run_main_job(out: Path, *, checkpoint: Path | None, steps: int | None = None, seed: int = 0,
                 targets: tuple[str, ...] | None = None, runs: int = 3, force: bool = False,
                 cache: Path | None = None, quantize: bool = True, log=print) -> dict:
    """The chain of the module doc; returns the summary also written to ``out/summary.json``."""
    from targets import target_names
    from toolkit.atomic import write_text_atomically
    from toolkit.generate import generate_accompaniment

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it or choose "
                                  "another --out")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    cache = Path(cache) if cache is not None else out.resolve().parent / ".cache"
    targets = target_names() if targets is None else tuple(targets)
    t_start = time.time()
    stages = Stages(7 if quantize else 4, log)

    # 1. reference generation at full precision.
    pipe = load_checkpoint(checkpoint)
    steps = steps or pipe.config.default_steps
    guidance = pipe.config.default_guidance
    log(f"checkpoint: {describe_checkpoint(pipe)}; {steps} steps")
    stages.start("reference", f"full-precision generation, {steps} steps")
    out.mkdir(parents=True, exist_ok=True)
    seconds = pipe.segment_samples / pipe.sample_rate
    # The synthesizer writes at least a second (one melody note); a longer pair is cropped to a segment.
    vocals, true_acc, labels = synth_pair_at_rate(10_000 + seed, seconds=max(1.0, seconds),
                                                  sample_rate=pipe.sample_rate, channels=pipe.audio_channels)
    vocals, true_acc = vocals[:, :pipe.segment_samples], true_acc[:, :pipe.segment_samples]
    sf.write(out / "vocals.wav", vocals.T, pipe.sample_rate)
    sf.write(out / "true_accompaniment.wav", true_acc.T, pipe.sample_rate)
    t0 = time.time()
    acc = generate_accompaniment(pipe, vocals, steps=steps, guidance=guidance, seed=seed, progress=True)
    gen_s = time.time() - t0
    sf.write(out / "accompaniment.wav", acc.T, pipe.sample_rate)
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    agreement = _agreement(acc, pipe.sample_rate, labels)
    summary = {
        "checkpoint": str(pipe.path), "checkpoint_description": describe_checkpoint(pipe),
        "model": pipe.config.name, "steps": steps, "guidance": guidance,
        "guidance_folded": pipe.config.guidance_folded, "audio_s": round(seconds, 3),
        "generate_s": round(gen_s, 2), "key": labels["key"]["name"], "tempo_bpm": labels["tempo_bpm"],
        "true_chords": [c["name"] for c in labels["chords"]], **agreement,
        "outputs": {"vocals": str(out / "vocals.wav"), "accompaniment": str(out / "accompaniment.wav"),
                    "true_accompaniment": str(out / "true_accompaniment.wav")},
    }
    stages.done(f"{seconds:.2f} s of audio in {gen_s:.1f} s")

    plan = calib_dir = None
    if quantize:
        calib_dir, table = _calibration_and_sensitivity(pipe, cache, steps=steps, guidance=guidance, seed=seed,
                                                        stages=stages, log=log)
        summary["calibration_set"], summary["sensitivity"] = str(calib_dir), table["_path"]
    # 4-5. plan by measurement, then every bundle.
    bundles_dir, reports_dir = out / "bundles", out / "reports"
    bundles: list[Path] = []
    failed_reports: list[Path] = []
    if quantize:
        stages.start("plan", "w8a8 refined by sensitivity; quantized bundles judged on this host")
        plan, quantized, attempts = _plan_by_measurement(pipe, table, calib_dir, bundles_dir, targets=targets,
                                                         steps=steps, log=log)
        (out / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        bundles += quantized
        for target, why in plan["search"]["export_errors"].items():
            failed_reports.append(_export_failure_report(reports_dir, pipe, target, plan["name"], why))
        summary["plan"] = {"path": str(out / "plan.json"), "attempts": attempts,
                           "size_ratio": plan["budget"]["size_ratio"],
                           "predicted_latent_snr_db": plan["search"]["predicted_latent_snr_db"]}
        stages.done(f"min SNR target {attempts[-1]['min_snr_db']} dB after {len(attempts)} attempt(s); "
                    f"denoiser at {plan['budget']['size_ratio']:.2f} of its fp32 bytes")
    stages.start("export fp32", ", ".join(targets))
    from toolkit.bundle import export_bundle

    for target in targets:
        t0 = time.time()
        try:
            b = export_bundle(pipe, target=target, out_root=bundles_dir, steps=steps, progress=True)
        except (ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            failed_reports.append(_export_failure_report(reports_dir, pipe, target, "fp32", why))
            log(f"  {target} fp32: export failed ({why[:200]}) [{time.time() - t0:.0f} s]")
            continue
        bundles.append(b)
        log(f"  {b.name} in {time.time() - t0:.0f} s")
    stages.done()

    # 6. verify where each runtime runs.
    from toolkit.matrix import render_in_subprocess, verify_in_subprocess

    stages.start("verify", f"{len(bundles)} bundles, {runs} timed runs each, one process per bundle")
    reports = {}
    for i, b in enumerate(sorted(bundles), 1):
        t0 = time.time()
        rp = reports_dir / f"{b.name}.report.json"
        rep = verify_in_subprocess(b, rp, runs=runs, warmup=1)
        reports[b.name] = {"path": str(rp), "status": rep["status"], "reason": rep["reason"],
                           "runner": rep.get("runner"), "target": rep.get("target"),
                           "precision": rep.get("precision")}
        log(f"  ({i}/{len(bundles)}) {b.name}: {rep['status']}"
            + (f" — {rep['reason']}" if rep["reason"] else "") + f" [{time.time() - t0:.0f} s]")
    for rp in failed_reports:
        rep = json.loads(rp.read_text())
        reports[Path(rep["bundle"]).name] = {"path": str(rp), "status": rep["status"], "reason": rep["reason"],
                                             "runner": None, "target": rep["target"], "precision": rep["precision"]}
    summary["reports"] = reports
    stages.done()

    # 7. the page.
    stages.start("report", "report.html, matrix/")
    listening = _listening(pipe, bundles, reports, out / "listening", steps=steps,
                           render=render_in_subprocess, log=log)
    from toolkit.report import write_matrix
    from toolkit.report_html import write_report_html

    report_paths = [Path(r["path"]) for r in reports.values()]
    written = write_matrix(report_paths, out / "matrix")
    agreement_note = (f"One {seconds:.2f} s synthetic vocal (key {labels['key']['name']}, {labels['tempo_bpm']:.0f} BPM), "
                      f"seed {seed}, {steps} steps: single-track figures are noisy. 96 held-out pairs: "
                      "python benchmarks/demo_agreement.py (BENCHMARKS.md).")
    page = write_report_html(
        report_paths, out / "report.html", title=f"adm-edge: {pipe.config.name}",
        header={"checkpoint": describe_checkpoint(pipe), "steps": steps, "guidance": guidance,
                "plan": (f"{plan['name']} refined: predicted latent SNR {plan['search']['predicted_latent_snr_db']:.1f} dB, "
                         f"denoiser {plan['budget']['size_ratio']:.2f} × fp32 bytes, "
                         f"{len(plan['overrides'])} layers above the default" if plan else "none (--no-quantize)"),
                "host": _host(), "command": "toolkit run --out " + str(out)},
        listening=listening, agreement={**agreement, "note": agreement_note}, bundle_search=[bundles_dir])
    summary["report_html"] = str(page)
    summary["agreement_note"] = agreement_note
    summary["matrix"] = {k: str(v) for k, v in written.items()}
    stages.done(str(page))
    summary["stage_seconds"] = stages.durations
    summary["total_s"] = round(time.time() - t_start, 1)
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _export_failure_report(reports_dir: Path, pipe, target: str, precision: str, why: str) -> Path:
    """A report row for a bundle that could not be exported (status fail, the exporter's message)."""
    from targets import TARGETS

    name = TARGETS[target].bundle_name(pipe.config.name, precision)
    path = reports_dir / f"{name}.report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "format_version": 1, "bundle": name, "target": target, "model": pipe.config.name, "precision": precision,
        "device": {}, "latency": {}, "end_to_end": {}, "memory": {}, "quality": {}, "budget": {},
        "status": "fail", "reason": f"export failed on the host: {why[:500]}"}, indent=2) + "\n")
    return path


def _host() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"


def _calibration_and_sensitivity(pipe, cache: Path, *, steps: int, guidance: float, seed: int, stages, log):
    from calibration.sampling import calibrate
    from calibration.sensitivity import sensitivity
    from toolkit.data.synth import write_synth_dataset
    from toolkit.fingerprint import module_digest

    seconds = max(1.0, pipe.segment_samples / pipe.sample_rate)
    data_spec = {"n": CALIB_TRACKS, "seconds": round(seconds, 4), "sample_rate": max(pipe.sample_rate, 16000),
                 "seed": CALIB_DATA_SEED}
    calib_inputs = {"denoiser": module_digest(pipe.denoiser), "vae": module_digest(pipe.vae), "steps": steps,
                    "guidance": guidance, "data": data_spec, "size": CALIB_SIZE,
                    "strategy": "activation-aware", "seed": seed}
    key = _key(calib_inputs)
    data_dir = cache / f"synth-{CALIB_TRACKS}x{seconds:.3f}s-seed{CALIB_DATA_SEED}"
    calib_dir = cache / f"calib-{key}"
    stages.start("calibration set", f"PTQ4ADM activation-aware, K={CALIB_SIZE}, {CALIB_TRACKS} synthetic vocals")
    if (calib_dir / "manifest.json").is_file():
        stages.done(f"reused {calib_dir} (same model, steps, data and settings)")
    else:
        if not data_dir.is_dir():
            write_synth_dataset(data_dir, n=CALIB_TRACKS, seconds=seconds, sample_rate=data_spec["sample_rate"],
                                channels=1, seed=CALIB_DATA_SEED, progress=False)
        calibrate(pipe, data_dir, strategy="activation-aware", size=CALIB_SIZE, steps=steps, seed=seed,
                  out_dir=calib_dir, guidance=guidance, show_progress=True)
        (calib_dir.parent / f"{calib_dir.name}.inputs.json").write_text(json.dumps(calib_inputs, indent=1))
        stages.done(str(calib_dir))
    sens_path = cache / f"sensitivity-{key}-{'-'.join(SENSITIVITY_PRECISIONS)}-{SENSITIVITY_EXAMPLES}ex.json"
    stages.start("sensitivity", f"{'/'.join(SENSITIVITY_PRECISIONS)} per layer, {SENSITIVITY_EXAMPLES} examples "
                                f"× {steps} steps each")
    reused = sens_path.is_file() and json.loads(sens_path.read_text()).get("complete")
    table = sensitivity(pipe, calib_dir, out_path=sens_path, precisions=SENSITIVITY_PRECISIONS,
                        n_eval=SENSITIVITY_EXAMPLES, resume=True, show_progress=True)
    table["_path"] = str(sens_path)
    stages.done(f"{'reused' if reused else 'wrote'} {sens_path} ({len(table['layers'])} layers)")
    return calib_dir, table


def _plan_by_measurement(pipe, table: dict, calib_dir: Path, bundles_dir: Path, *, targets, steps: int, log):
    """Raise the plan's predicted-SNR target until every quantized bundle passes its host check."""
    from calibration.fakequant import quantizable_leaves
    from calibration.plan import DEFAULT_MIN_SNR_DB, make_plan
    from calibration.sensitivity import layer_sizes
    from toolkit.bundle import export_bundle
    from toolkit.components import component_specs
    from toolkit.export_errors import QualityBudgetError

    sizes, fp32_bytes = layer_sizes(pipe.denoiser)
    decoder_layers = list(quantizable_leaves(component_specs(pipe)["vae_decoder"].module))
    sens = {k: v for k, v in table.items() if k != "_path"}
    attempts = []
    min_snr = DEFAULT_MIN_SNR_DB
    # Targets whose runtime runs here first (their host check is the lowered graph itself), the
    # quickest to export first: a failing plan is found in seconds, not after an ExecuTorch export.
    order = sorted(targets, key=lambda t: {"onnx": 0, "executorch": 1}.get(t, 2))
    for attempt in range(1, PLAN_MAX_ATTEMPTS + 1):
        plan = make_plan(PLAN_PRESET, sizes, fp32_bytes, sensitivity=sens, sensitivity_source=table["_path"],
                         model=pipe.config.name, min_snr_db=min_snr, vae_decoder_layers=decoder_layers,
                         keep_high=pipe.family.keep_high)
        record = {"min_snr_db": min_snr, "predicted_latent_snr_db": plan["search"]["predicted_latent_snr_db"],
                  "layers_above_default": len(plan["overrides"]), "size_ratio": plan["budget"]["size_ratio"],
                  "bundles": {}}
        attempts.append(record)
        log(f"  attempt {attempt}: target {min_snr:g} dB → predicted {record['predicted_latent_snr_db']:.1f} dB, "
            f"{record['layers_above_default']} layers above w8a8, {record['size_ratio']:.2f} × fp32 bytes")
        made, failed, export_errors = [], None, {}
        for target in order:
            t0 = time.time()
            try:
                b = export_bundle(pipe, target=target, out_root=bundles_dir, steps=steps, plan=plan, calib=calib_dir,
                                  progress=True)
            except QualityBudgetError as exc:
                failed = (target, str(exc))
                record["bundles"][target] = {"status": "fail", "why": str(exc)[:300]}
                log(f"    {target}: breaks the budget on this host [{time.time() - t0:.0f} s]; raising the plan")
                break
            except (ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
                # The target cannot lower this plan at all: no precision search fixes that; say so.
                export_errors[target] = f"{type(exc).__name__}: {exc}"
                record["bundles"][target] = {"status": "export failed", "why": export_errors[target][:300]}
                log(f"    {target}: export failed ({export_errors[target][:200]}) [{time.time() - t0:.0f} s]")
                continue
            check = json.loads((b / "manifest.json").read_text()).get("host_check") or {}
            worst = (check.get("aggregate") or {}).get("latent_snr_db")
            record["bundles"][target] = {"bundle": b.name, "status": check.get("status"), "kind": check.get("kind"),
                                         "worst_latent_snr_db": worst}
            log(f"    {b.name}: host check {check.get('status')} ({check.get('kind')}; worst latent SNR "
                f"{worst:.1f} dB) [{time.time() - t0:.0f} s]")
            made.append(b)
        if failed is None:
            plan["search"]["measured"] = {"how": "quantized bundles exported and judged on this host",
                                          "attempts": attempts}
            plan["search"]["export_errors"] = export_errors
            return plan, made, attempts
        for b in made:
            shutil.rmtree(b, ignore_errors=True)
        min_snr += PLAN_SNR_STEP_DB
    raise RuntimeError(f"no plan up to a {min_snr - PLAN_SNR_STEP_DB:g} dB target passes on this host: "
                       f"{failed[0]}: {failed[1]}")


def _listening(pipe, bundles: list[Path], reports: dict, out: Path, *, steps: int, render, log) -> dict:
    """The same vocal and seed through the full-precision model and every bundle that runs here."""
    from toolkit.reference import REFERENCE_EXAMPLES, reference_track

    out.mkdir(parents=True, exist_ok=True)
    assert LISTEN_EXAMPLE < REFERENCE_EXAMPLES
    vocals, true_acc, labels = reference_track(pipe, LISTEN_EXAMPLE)
    clips = [{"label": "vocal (input)", "audio": vocals[0]},
             {"label": "true accompaniment", "audio": true_acc[0]}]
    ref_bundle = next(iter(sorted(bundles)), None)
    full = np.load(ref_bundle / "reference" / "outputs.npz")["audio"][LISTEN_EXAMPLE, LISTEN_SEED_INDEX]
    clips.append({"label": f"full precision (PyTorch fp32, {steps} steps)", "audio": full[0]})
    not_rendered = []
    for b in sorted(bundles):
        rep = reports.get(b.name) or {}
        if rep.get("status") == "unavailable":
            not_rendered.append(f"{b.name}: {rep.get('reason')}")
            continue
        if rep.get("precision") == "fp32":
            continue  # its output equals the reference within parity; the quantized ones are the question
        try:
            audio = np.load(render(b, out / f"{b.name}.npy", example=LISTEN_EXAMPLE, seed_index=LISTEN_SEED_INDEX))
        except RuntimeError as exc:
            not_rendered.append(f"{b.name}: {exc}")
            continue
        sf.write(out / f"{b.name}.wav", audio.T, pipe.sample_rate)
        agree = _agreement(audio, pipe.sample_rate, labels)
        clips.append({"label": f"{b.name} ({rep.get('target')}, {rep.get('precision')})", "audio": audio[0],
                      "note": None if agree["chord_accuracy"] is None else
                      f"chord accuracy {agree['chord_accuracy']:.2f}, tempo match {agree['tempo_match']}, "
                      f"beat alignment {agree['beat_alignment']:.2f}"})
        log(f"  rendered {b.name} for listening")
    for c, name in zip(clips, ("vocal.wav", "true_accompaniment.wav", "full_precision.wav")):
        c.setdefault("note", None)
        sf.write(out / name, c["audio"], pipe.sample_rate)
        c["file"] = name
    for c in clips[3:]:
        c["file"] = c["label"].split(" ")[0] + ".wav"
    listening = {"sample_rate": pipe.sample_rate, "clips": clips, "not_rendered": not_rendered,
            "description": (f"Reference example {LISTEN_EXAMPLE} of every bundle (a synthetic vocal, key "
                            f"{labels['key']['name']}, {labels['tempo_bpm']:.0f} BPM) with initial noise "
                            f"{LISTEN_SEED_INDEX}: the same vocal and seed through each. Audio is the model's "
                            f"{pipe.sample_rate} Hz output, upsampled for the player and normalised to its peak.")}
    (out / "clips.json").write_text(json.dumps({**listening, "clips": [
        {k: v for k, v in c.items() if k != "audio"} for c in clips]}, indent=1) + "\n")
    return listening
