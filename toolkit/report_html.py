"""``report.html``: one self-contained page a person opens after ``toolkit run`` or ``toolkit report``.

Everything is embedded (plots as PNG data URIs, audio as WAV data URIs), so the page needs no
network and no files beside it. Sections:

- the matrix: target × precision × device with status, latency per component (one call each) and
  end to end (one whole generation), "× real time" (seconds of audio per second of wall time:
  above 1 is faster than real time), size against the fp32 bundle of the same target, and each
  quality line against its budget, with plots on scales where quantized rows are visible;
- listening: one vocal and one seed, the true accompaniment, the full-precision generation and
  each quantized bundle's generation, with their log-mel spectrograms side by side;
- the lowering summary per bundle (layers int8 / int4 / float and why any departed from the plan);
- musical agreement of the run's generation with chance levels beside it.

Each report row carries a run id (the first 10 hex digits of the report file's sha256), so two
runs of one bundle can be told apart; the run's date is the report's ``run.finished_utc`` when the
toolkit wrote it (:func:`toolkit.matrix.verify_in_subprocess`), else the file's time.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import json
from pathlib import Path

import numpy as np

from toolkit.atomic import write_text_atomically

COMPONENT_ORDER = ("vae_encoder", "denoiser", "vae_decoder")
COMPONENT_LABEL = {"vae_encoder": "VAE encoder", "denoiser": "denoiser", "vae_decoder": "VAE decoder"}
PLAYBACK_RATE_HZ = 8000  # browsers play any WAV, but some refuse rates below 3 kHz: upsample for the player
# Chance levels of the musical-agreement figures (toolkit.data.music's definitions).
CHANCE = {
    "chord_accuracy": (1 / 24, "one of the 24 major/minor triads drawn at random"),
    "key_correct_or_relative": (2 / 24, "a random key of 24 is right or the relative one"),
    "tempo_match": (None, "no closed form (depends on the tempo range): see BENCHMARKS.md's random-weights row"),
    "beat_alignment": (1.0, "1 = onsets unrelated to the labelled beats"),
}


def run_id(report_path: Path) -> str:
    return hashlib.sha256(Path(report_path).read_bytes()).hexdigest()[:10]


def _run_date(report: dict, path: Path) -> str:
    when = (report.get("run") or {}).get("finished_utc")
    if when:
        return when
    return dt.datetime.fromtimestamp(Path(path).stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _bundle_dir(report: dict, search: list[Path]) -> Path | None:
    """The bundle a report was made from, when it is on this machine (by path, else by name)."""
    name = Path(report.get("bundle") or "").name
    candidates = [Path(report["bundle"])] if report.get("bundle") else []
    candidates += [d / name for d in search]
    return next((c for c in candidates if (c / "manifest.json").is_file()), None)


def _component_bytes(bundle: Path, manifest: dict) -> int:
    return sum((bundle / c["path"]).stat().st_size for c in manifest["components"].values()
               if (bundle / c["path"]).exists())


def lowering_summary(manifest: dict) -> dict:
    """Per component: how many planned layers run int8 / int4 / float, and the departures with why."""
    out = {}
    for name, comp in manifest["components"].items():
        layers = ((comp.get("details") or {}).get("lowering") or {}).get("layers") or {}
        counts: dict[str, int] = {}
        for rec in layers.values():
            w = rec["applied"].get("weights", "fp32")
            a = rec["applied"].get("activations", "fp32")
            key = (f"W{w[3:]}A{a[3:]}" if w.startswith("int") and a.startswith("int") else
                   f"W{w[3:]} weight-only" if w.startswith("int") else "float")
            counts[key] = counts.get(key, 0) + 1
        why: dict[str, int] = {}
        for rec in layers.values():
            if not rec.get("honoured", True):
                why[rec.get("why") or "?"] = why.get(rec.get("why") or "?", 0) + 1
        out[name] = {"precision": comp.get("precision"), "planned_layers": len(layers), "applied": counts,
                     "departures": why}
    return out


def table_rows(reports: list[dict], paths: list[Path], *, bundle_search: list[Path] = ()) -> list[dict]:
    """One row per report, with the figures the page shows (None where a report has none)."""
    rows = []
    manifests = {}
    for r, p in zip(reports, paths):
        bdir = _bundle_dir(r, [*bundle_search, Path(p).parent.parent / "bundles"])
        manifest = json.loads((bdir / "manifest.json").read_text()) if bdir else None
        lat = r.get("latency") or {}
        e2e = r.get("end_to_end") or {}
        agg = (r.get("quality") or {}).get("aggregate") or {}
        lines = (r.get("budget") or {}).get("lines") or []
        dev = r.get("device") or {}
        row = {
            "run_id": run_id(p), "date": _run_date(r, p), "source": str(p),
            "bundle": Path(r.get("bundle") or "?").name, "model": r.get("model"), "target": r.get("target"),
            "precision": r.get("precision"), "status": r.get("status"), "reason": r.get("reason"),
            "runner": r.get("runner") or "python",
            "device": f"{dev.get('machine', '?')}, {dev.get('cpu_count', '?')} CPUs"
                      + (f", {dev['threads']} threads" if dev.get("threads") else ""),
            "steps": e2e.get("steps") or (manifest or {}).get("sampler", {}).get("steps"),
            "calls_per_step": e2e.get("denoiser_calls_per_step"),
            "audio_s": e2e.get("audio_seconds"),
            **{f"{c}_ms": (lat.get(c) or {}).get("p50_ms") for c in COMPONENT_ORDER},
            "e2e_ms": e2e.get("p50_ms"),
            "x_real_time": e2e.get("real_time_factor"),
            "peak_rss_mb": (r.get("memory") or {}).get("peak_rss_mb"),
            "latent_snr_db": agg.get("latent_snr_db"),
            "worst_rel_spread": max((agg.get("relative_to_spread") or {}).values(), default=None),
            "budget_lines": lines,
            "limits": (r.get("budget") or {}).get("limits") or (manifest or {}).get("quality_budget") or {},
            "bytes": _component_bytes(bdir, manifest) if manifest else None,
            "manifest": manifest,
        }
        manifests[row["bundle"]] = manifest
        rows.append(row)
    fp32 = {(r["model"], r["target"]): r["bytes"] for r in rows if r["precision"] == "fp32" and r["bytes"]}
    for r in rows:
        base = fp32.get((r["model"], r["target"]))
        r["size_vs_fp32"] = (r["bytes"] / base) if (base and r["bytes"]) else None
    return rows


# --- plots ---------------------------------------------------------------------------------------


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _label(r: dict) -> str:
    return f"{r['target']}\n{r['precision']}\n{r['run_id'][:6]}"


def plots(rows: list[dict]) -> dict[str, str]:
    """PNG data URIs: latency per component (one call), end to end, × real time, quality vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    ran = [r for r in rows if r["e2e_ms"] is not None]
    if ran:
        x = np.arange(len(ran))
        width = 0.8 / len(COMPONENT_ORDER)
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ran)), 4))
        for k, c in enumerate(COMPONENT_ORDER):
            ax.bar(x + (k - 1) * width, [r[f"{c}_ms"] or 0 for r in ran], width, label=COMPONENT_LABEL[c])
        ax.set_xticks(x, [_label(r) for r in ran], fontsize=7)
        ax.set_ylabel("p50 latency of ONE call (ms)")
        ax.set_title("Per component: ONE call each", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["latency"] = _png_uri(fig)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ran)), 4))
        ax.bar(x, [r["x_real_time"] for r in ran], color="#4a7")
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="real time (1×)")
        ax.set_xticks(x, [_label(r) for r in ran], fontsize=7)
        ax.set_ylabel("× real time (audio s per wall s; higher is faster)")
        ax.set_title("End to end: one whole generation", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out["real_time"] = _png_uri(fig)
        plt.close(fig)

    judged = [r for r in rows if r["latent_snr_db"] is not None]
    if judged:
        x = np.arange(len(judged))
        colors = ["#c44" if r["status"] == "fail" else "#48c" if r["precision"] == "fp32" else "#e92"
                  for r in judged]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(judged)), 4))
        snr = [min(r["latent_snr_db"], 120.0) for r in judged]
        a1.bar(x, snr, color=colors)
        floors = {r["limits"].get("latent_snr_db_min") for r in judged} - {None}
        for f in sorted(floors):
            a1.axhline(f, color="r", lw=0.9, ls="--", label=f"budget floor {f:g} dB")
        a1.set_xticks(x, [_label(r) for r in judged], fontsize=7)
        a1.set_ylabel("latent SNR vs full precision, worst example (dB)")
        a1.set_title("Higher is better (capped at 120 dB)")
        a1.legend(fontsize=7)
        rel = [max(r["worst_rel_spread"] or 1e-6, 1e-6) for r in judged]
        a2.bar(x, rel, color=colors)
        limits = {r["limits"].get("max_relative_to_spread") for r in judged} - {None}
        for lim in sorted(limits):
            a2.axhline(lim, color="r", lw=0.9, ls="--", label=f"budget limit {lim:g}")
        a2.set_yscale("log")
        a2.set_xticks(x, [_label(r) for r in judged], fontsize=7)
        a2.set_ylabel("worst audio distance / seed spread (log)")
        a2.set_title("Lower is better; 1 = as far as another seed")
        a2.legend(fontsize=7)
        fig.suptitle("Quality against the budget (blue fp32, orange quantized, red failed)", fontsize=9)
        fig.tight_layout()
        out["quality"] = _png_uri(fig)
        plt.close(fig)
    return out


def spectrogram_uri(audio: np.ndarray, sample_rate: int, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime_py.metrics import log_mel

    mel = log_mel(np.asarray(audio, np.float32), sample_rate)
    fig, ax = plt.subplots(figsize=(3.4, 2.2))
    hop_s = (int(2 ** np.round(np.log2(0.046 * sample_rate))) // 4) / sample_rate
    ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma", vmin=-11, vmax=max(-10.0, float(mel.max())),
              extent=(0, mel.shape[0] * hop_s, 0, mel.shape[1]))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("s", fontsize=7)
    ax.set_ylabel("mel band", fontsize=7)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    uri = _png_uri(fig)
    plt.close(fig)
    return uri


def wav_uri(audio: np.ndarray, sample_rate: int) -> str:
    """16-bit PCM WAV data URI, resampled to PLAYBACK_RATE_HZ and normalised to its peak."""
    import soundfile as sf

    x = np.asarray(audio, np.float32)
    x = x.mean(axis=0) if x.ndim == 2 else x
    if sample_rate != PLAYBACK_RATE_HZ:
        from fractions import Fraction

        from scipy.signal import resample_poly

        f = Fraction(PLAYBACK_RATE_HZ, sample_rate)
        x = resample_poly(x, f.numerator, f.denominator)
    peak = float(np.max(np.abs(x))) or 1.0
    buf = io.BytesIO()
    sf.write(buf, (0.9 * x / peak).astype(np.float32), PLAYBACK_RATE_HZ, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


# --- page ------------------------------------------------------------------------------------------


def _f(v, spec=".1f", unit=""):
    if v is None:
        return "—"
    if isinstance(v, float) and not np.isfinite(v):
        return "∞" if v > 0 else "−∞"
    return format(v, spec) + unit


def _e(s) -> str:
    return html.escape("—" if s is None else str(s))


MATRIX_HEAD = ("target", "precision", "device / runner", "status", "steps × calls", "VAE encoder ms (1 call)",
               "denoiser ms (1 call)", "VAE decoder ms (1 call)", "end to end ms (1 generation)",
               "× real time ↑", "size vs fp32", "latent SNR dB (worst) ↑", "worst distance / spread ↓",
               "budget", "peak RSS MB", "run id", "date")


def _budget_cell(r: dict) -> str:
    """One short line per budget: the latent-SNR floor, and the paired distances as one line."""
    lines, lim = r["budget_lines"], r["limits"]
    if not lines:
        return ", ".join(f"{k} {v}" for k, v in lim.items()) or "—"
    snr = [ln for ln in lines if ln["metric"].startswith("latent_snr_db")]
    dist = [ln for ln in lines if "spread" in ln["metric"]]
    out = [f"{'✓' if ln['pass'] else '✗'} latent SNR {ln['limit']} dB" for ln in snr]
    if dist:
        bad = [ln["metric"].split(" ")[0] for ln in dist if not ln["pass"]]
        out.append(f"{'✗' if bad else '✓'} {len(dist)} distances / spread {dist[0]['limit']}"
                   + (f" (over: {', '.join(bad)})" if bad else ""))
    return "; ".join(out)


def _matrix_html(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in MATRIX_HEAD)
    body = []
    for r in rows:
        cls = {"pass": "pass", "fail": "fail"}.get(r["status"], "na")
        budget = _budget_cell(r)
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        size = "—" if r["size_vs_fp32"] is None else f"{r['size_vs_fp32']:.2f} ({r['bytes'] / 1e6:.2f} MB)"
        audio = f" for {r['audio_s']:.2f} s of audio" if r["audio_s"] else ""
        cells = [r["target"], r["precision"], f"{r['device']} / {r['runner']}", status,
                 f"{_f(r['steps'], 'd') if isinstance(r['steps'], int) else _e(r['steps'])} × "
                 f"{_f(r['calls_per_step'], '.0f')}",
                 _f(r["vae_encoder_ms"], ".2f"), _f(r["denoiser_ms"], ".2f"), _f(r["vae_decoder_ms"], ".2f"),
                 _f(r["e2e_ms"], ".1f") + audio, _f(r["x_real_time"], ".2f", "×"), size,
                 _f(r["latent_snr_db"], ".1f"), _f(r["worst_rel_spread"], ".3g"), budget,
                 _f(r["peak_rss_mb"], ".0f"), r["run_id"], r["date"]]
        body.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table class='matrix'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _lowering_html(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["manifest"] is None or r["precision"] == "fp32":
            continue
        summary = lowering_summary(r["manifest"])
        items = []
        for comp, s in summary.items():
            if not s["planned_layers"]:
                items.append(f"<li>{_e(COMPONENT_LABEL.get(comp, comp))}: {_e(s['precision'])} "
                             "(no planned layer: runs float)</li>")
                continue
            counts = ", ".join(f"{n} {k}" for k, n in sorted(s["applied"].items()))
            why = "".join(f"<li>{n} layers: {_e(w)}</li>" for w, n in s["departures"].items())
            items.append(f"<li>{_e(COMPONENT_LABEL.get(comp, comp))} ({s['planned_layers']} planned layers): "
                         f"{_e(counts)}" + (f"<ul>{why}</ul>" if why else " — all as planned") + "</li>")
        check = (r["manifest"].get("host_check") or {})
        host = (f"<p class='note'>Host quality check at export: {_e(check.get('status'))} — "
                f"{_e(check.get('kind'))}</p>") if check else ""
        parts.append(f"<h3>{_e(r['bundle'])}</h3><ul>{''.join(items)}</ul>{host}")
    return "".join(parts) or "<p>No quantized bundle among the reports (or their bundles are not on this machine).</p>"


def _listening_html(listening: dict | None) -> str:
    if not listening:
        return "<p>No listening material: run <code>toolkit run</code>, or pass <code>--run DIR</code> to " \
               "<code>toolkit report</code>.</p>"
    sr = listening["sample_rate"]
    cards = []
    for clip in listening["clips"]:
        audio = np.asarray(clip["audio"], np.float32)
        note = f"<p class='note'>{_e(clip.get('note'))}</p>" if clip.get("note") else ""
        cards.append(
            f"<figure class='clip'><figcaption>{_e(clip['label'])}</figcaption>"
            f"<audio controls preload='auto' src='{wav_uri(audio, sr)}'></audio>"
            f"<img alt='log-mel spectrogram: {_e(clip['label'])}' src='{spectrogram_uri(audio, sr, clip['label'])}'>"
            f"{note}</figure>")
    missing = "".join(f"<li>{_e(m)}</li>" for m in listening.get("not_rendered", []))
    return (f"<p>{_e(listening['description'])}</p><div class='clips'>{''.join(cards)}</div>"
            + (f"<p>Not rendered here:</p><ul>{missing}</ul>" if missing else ""))


def _agreement_html(agreement: dict | None) -> str:
    if not agreement:
        return "<p>No musical-agreement figures in this page's inputs.</p>"
    rows = []
    for key, label in (("chord_accuracy", "chord accuracy ↑"), ("chord_cosine", "chord cosine with the true triad ↑"),
                       ("key_correct_or_relative", "key or its relative right ↑"),
                       ("tempo_match", "tempo match (×1, ×2 or ×½, within 4 %) ↑"),
                       ("beat_alignment", "beat alignment ↑")):
        if key not in agreement:
            continue
        chance, why = CHANCE.get(key, (None, "—"))
        v = agreement[key]
        rows.append(f"<tr><td>{_e(label)}</td><td>{_e(_f(v, '.3f') if isinstance(v, float) else v)}</td>"
                    f"<td>{_e(_f(chance, '.3f'))}</td><td>{_e(why)}</td></tr>")
    return ("<table><thead><tr><th>figure</th><th>this run</th><th>chance</th><th>what chance means</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table><p class='note'>{_e(agreement.get('note'))}</p>")


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 6px;font-size:12px;
vertical-align:top}th{background:#eee}tr.pass{background:#e6f5e6}tr.fail{background:#fbe3e3}tr.na{background:#f2f2f2}
img{max-width:100%}.plots img{max-width:49%;margin:4px}.clips{display:flex;flex-wrap:wrap;gap:10px}
figure.clip{margin:0;border:1px solid #ccc;padding:6px;width:350px}figure.clip audio{width:100%}
.note{color:#555;font-size:12px}code{background:#f4f4f4;padding:0 3px}"""


def build_page(rows: list[dict], *, title: str, header: dict, listening: dict | None = None,
               agreement: dict | None = None) -> str:
    figs = plots(rows)
    meta = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in header.items())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "unavailable")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    imgs = "".join(f"<img alt='{k}' src='{uri}'>" for k, uri in figs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title><style>{CSS}</style></head><body>
<h1>{_e(title)}</h1>
<table class="meta">{meta}<tr><th>bundles</th><td>{_e(summary)}</td></tr></table>
<h2>Device matrix</h2>
<p class="note">Latency: p50 over the timed runs. Component columns are one call each; a generation makes
"steps × calls" denoiser calls. "× real time" = seconds of audio generated per second of wall time (above 1 is faster
than real time). Size: the bundle's component files against the fp32 bundle of the same target. Quality: against the
bundle's own full-precision reference (same vocal, same seed); "distance / spread" = paired audio distance divided by
the full-precision model's own seed-to-seed distance (1 = as different as another seed). Status "unavailable": the
target's runtime cannot run on this device (reason given); its bundle is complete. Run id: the first hex digits of the
report file's sha256.</p>
{_matrix_html(rows)}
<div class="plots">{imgs}</div>
<h2>Listening</h2>
{_listening_html(listening)}
<h2>Lowering per quantized bundle</h2>
{_lowering_html(rows)}
<h2>Musical agreement</h2>
{_agreement_html(agreement)}
</body></html>
"""


def write_report_html(report_paths: list[Path], out: Path, *, title: str = "adm-edge report",
                      header: dict | None = None, listening: dict | None = None, agreement: dict | None = None,
                      bundle_search: list[Path] = ()) -> Path:
    """Build the page from report files (any number of devices) and write it atomically to ``out``."""
    from toolkit.report import load_reports

    paths = [Path(p) for p in report_paths]
    reports = load_reports(paths)
    rows = table_rows(reports, paths, bundle_search=list(bundle_search))
    rows.sort(key=lambda r: (r["target"] or "", r["precision"] != "fp32", r["precision"] or "", r["device"]))
    head = {"generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **(header or {})}
    return write_text_atomically(Path(out), build_page(rows, title=title, header=head, listening=listening,
                                                       agreement=agreement))


def listening_from_run(run_dir: Path) -> tuple[dict | None, dict | None]:
    """The listening clips (``listening/clips.json`` and its WAVs) and the musical agreement
    (``summary.json``) that ``toolkit run`` left in ``run_dir``; None for what is missing."""
    import soundfile as sf

    run_dir = Path(run_dir)
    listening = agreement = None
    index = run_dir / "listening" / "clips.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        clips = []
        for c in meta["clips"]:
            audio, _ = sf.read(run_dir / "listening" / c["file"], dtype="float32", always_2d=True)
            clips.append({**c, "audio": audio.T[0]})
        listening = {**meta, "clips": clips}
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        agreement = {k: s[k] for k in ("chord_accuracy", "chord_cosine", "key_correct_or_relative", "tempo_match",
                                       "beat_alignment") if k in s}
        agreement["note"] = s.get("agreement_note")
    return listening, agreement
