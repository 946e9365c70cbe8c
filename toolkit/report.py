"""``toolkit report``: merge device reports into a device matrix (markdown, HTML, PNG plots)."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

COMPONENT_ORDER = ("vae_encoder", "denoiser", "vae_decoder")


def load_reports(paths: list[Path]) -> list[dict]:
    reports = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: cannot read report ({exc})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{p}: not a runtime_py report (a JSON {type(r).__name__}, not an object)")
        for key in ("target", "status", "device", "latency"):
            if key not in r:
                raise ValueError(f"{p}: field '{key}' is missing; is this a runtime_py report?")
        r["_source"] = str(p)
        reports.append(r)
    return reports


def _device_label(r: dict) -> str:
    d = r.get("device") or {}
    return f"{d.get('machine', '?')} / {d.get('cpu_count', '?')} cpu" if d else "?"


def _fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def rows(reports: list[dict]) -> list[dict]:
    out = []
    for r in reports:
        lat = r.get("latency") or {}
        e2e = r.get("end_to_end") or {}
        agg = (r.get("quality") or {}).get("aggregate") or {}
        rel = agg.get("relative_to_spread") or {}
        out.append({
            "bundle": Path(r.get("bundle") or "?").name, "target": r["target"],
            "precision": r.get("precision"), "device": _device_label(r), "status": r["status"],
            "reason": r.get("reason"),
            **{f"{c}_p50_ms": (lat.get(c) or {}).get("p50_ms") for c in COMPONENT_ORDER},
            "e2e_p50_ms": e2e.get("p50_ms"), "rtf": e2e.get("real_time_factor"),
            "steps": e2e.get("steps"), "calls_per_step": e2e.get("denoiser_calls_per_step"),
            "latent_snr_db": agg.get("latent_snr_db"),
            "worst_rel_spread": max(rel.values()) if rel else None,
            "peak_rss_mb": (r.get("memory") or {}).get("peak_rss_mb"),
        })
    return out


def matrix_markdown(table: list[dict]) -> str:
    head = ("| bundle | target | device | status | enc p50 ms | denoiser p50 ms | dec p50 ms | "
            "end-to-end p50 ms | RTF | latent SNR dB | worst dist / spread | peak RSS MB |")
    lines = [head, "|" + " --- |" * 12]
    for r in table:
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        lines.append(
            f"| {r['bundle']} | {r['target']} | {r['device']} | {status} | "
            f"{_fmt(r['vae_encoder_p50_ms'])} | {_fmt(r['denoiser_p50_ms'])} | "
            f"{_fmt(r['vae_decoder_p50_ms'])} | {_fmt(r['e2e_p50_ms'])} | {_fmt(r['rtf'], '.2f')} | "
            f"{_fmt(r['latent_snr_db'])} | {_fmt(r['worst_rel_spread'], '.3f')} | "
            f"{_fmt(r['peak_rss_mb'], '.0f')} |")
    return "\n".join(lines) + "\n"


def plot_matrix(table: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ran = [r for r in table if r["e2e_p50_ms"] is not None]
    paths = []
    if not ran:
        return paths
    labels = [f"{r['bundle']}\n{r['device']}" for r in ran]
    x = np.arange(len(ran))

    def new_axes():
        return plt.subplots(figsize=(max(5, 1.6 * len(ran)), 4))

    def finish(fig, ax, name: str, ylabel: str, title: str) -> None:
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = new_axes()
    bottom = np.zeros(len(ran))
    for c in COMPONENT_ORDER:
        vals = np.array([r[f"{c}_p50_ms"] or 0.0 for r in ran])
        ax.bar(x, vals, bottom=bottom, label=f"{c} (one call)")
        bottom += vals
    finish(fig, ax, "latency.png", "p50 latency per call (ms)", "Component latency per target and device")

    fig, ax = new_axes()
    ax.bar(x, [r["rtf"] for r in ran])
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="real time")
    finish(fig, ax, "rtf.png", "real-time factor (audio s / wall s)", "End-to-end real-time factor")

    fig, ax = new_axes()
    ax.bar(x, [r["worst_rel_spread"] or 0.0 for r in ran], label="worst paired distance / seed spread")
    ax.axhline(0.25, color="r", lw=0.8, ls="--", label="default budget (0.25)")
    finish(fig, ax, "quality.png", "fraction of the model's own seed spread", "Quality against the budget")
    return paths


def matrix_html(table: list[dict], plots: list[Path]) -> str:
    cols = ["bundle", "target", "device", "status", "reason", "vae_encoder_p50_ms", "denoiser_p50_ms",
            "vae_decoder_p50_ms", "e2e_p50_ms", "rtf", "latent_snr_db", "worst_rel_spread", "peak_rss_mb"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in table:
        color = {"pass": "#dfd", "fail": "#fdd"}.get(r["status"], "#eee")
        cells = "".join(
            f"<td>{html.escape(_fmt(r[c], '.2f') if isinstance(r[c], float) else str(r[c] if r[c] is not None else '—'))}</td>"
            for c in cols)
        body += f"<tr style='background:{color}'>{cells}</tr>\n"
    imgs = "".join(
        f"<img alt='{p.stem}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        for p in plots)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>adm-edge device matrix</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
            "padding:3px 6px;font-size:12px}img{max-width:48%;margin:4px}</style></head><body>"
            f"<h1>adm-edge device matrix</h1><table><tr>{head}</tr>\n{body}</table>{imgs}</body></html>\n")


def write_matrix(report_paths: list[Path], out_dir: Path) -> dict[str, Path]:
    """Write matrix.md, matrix.html (plots embedded) and the PNG plots under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows(load_reports(report_paths))
    plots = plot_matrix(table, out_dir)
    written = {}
    for name, text in (("matrix.md", "# Device matrix\n\n" + matrix_markdown(table)),
                       ("matrix.html", matrix_html(table, plots))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
        written[name] = out_dir / name
    written.update({p.name: p for p in plots})
    return written
