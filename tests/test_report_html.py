"""report.html: built from reports of a tiny seeded model, then opened in a real headless Chromium.

The page is checked as a person gets it: it loads with no console error, every audio element
reports a duration, every image decodes; a screenshot is saved under the test's tmp dir. Where
Debian's chromium is not installed the browser test skips and says why (``.ci/run`` installs it
where it runs as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--mute-audio")
# Appended to a copy of the page: waits for every audio element's metadata (or error) and every
# image, records errors (script errors and failed loads, capture phase), and writes the result into
# the DOM for --dump-dom.
PROBE = """<script>
(function(){
  var errors=[];
  window.addEventListener('error',function(e){errors.push(String(e.message||(e.target&&(e.target.src||'').slice(0,60))||'error'));},true);
  var oe=console.error;console.error=function(){errors.push(Array.prototype.join.call(arguments,' '));oe.apply(console,arguments);};
  function ready(){
    var a=[].slice.call(document.querySelectorAll('audio')),im=[].slice.call(document.querySelectorAll('img'));
    return a.every(function(x){return x.readyState>=1||x.error;})&&im.every(function(x){return x.complete;});
  }
  function report(){
    var a=[].slice.call(document.querySelectorAll('audio')),im=[].slice.call(document.querySelectorAll('img'));
    var pre=document.createElement('pre');pre.id='probe';
    pre.textContent=JSON.stringify({errors:errors,
      audio:a.map(function(x){return {duration:x.duration,error:x.error?x.error.code:null};}),
      images:im.map(function(x){return {w:x.naturalWidth,h:x.naturalHeight,alt:x.alt};})});
    document.body.appendChild(pre);
  }
  var tries=0;(function wait(){ if(ready()||tries++>100){report();} else {setTimeout(wait,100);} })();
})();
</script>"""


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def _tiny_run(tmp_path: Path) -> tuple[list[Path], dict, Path]:
    """fp32 and a quantized-looking ONNX report of the tiny model, plus a listening section."""
    from tests.test_bundle import tiny_pipeline
    from toolkit.bundle import export_bundle
    from toolkit.matrix import verify_in_subprocess

    pipe = tiny_pipeline()
    bundle = export_bundle(pipe, target="onnx", out_root=tmp_path / "bundles", steps=2)
    rp = verify_in_subprocess(bundle, tmp_path / "reports" / f"{bundle.name}.report.json", runs=1, warmup=0)
    assert rp["status"] == "pass", rp["reason"]
    report = json.loads((tmp_path / "reports" / f"{bundle.name}.report.json").read_text())
    # A second device's report of the same bundle (another run: another run id) and a target that
    # cannot run there.
    other = {**report, "device": {**report["device"], "machine": "aarch64", "cpu_count": 8},
             "end_to_end": {**report["end_to_end"], "p50_ms": report["end_to_end"]["p50_ms"] * 2}}
    (tmp_path / "reports" / "other.report.json").write_text(json.dumps(other))
    unavailable = {**report, "target": "coreml", "status": "unavailable", "reason": "Core ML runs only on macOS",
                   "latency": {}, "end_to_end": {}, "quality": {}, "bundle": "tiny-coreml"}
    (tmp_path / "reports" / "coreml.report.json").write_text(json.dumps(unavailable))
    ref = np.load(bundle / "reference" / "outputs.npz")["audio"][0, 0]
    rng = np.random.default_rng(0)
    listening = {"sample_rate": pipe.sample_rate, "description": "tiny model, reference example 0, seed 0",
                 "not_rendered": ["tiny-coreml: Core ML runs only on macOS"],
                 "clips": [{"label": "vocal", "audio": rng.standard_normal(ref.shape[-1]).astype(np.float32) * 0.1},
                           {"label": "full precision", "audio": ref[0]},
                           {"label": "tiny-onnx-w8a8", "audio": ref[0] * 0.9, "note": "tiny"}]}
    paths = sorted((tmp_path / "reports").glob("*.json"))
    return paths, listening, bundle


def test_report_html_is_self_contained_with_human_headers(tmp_path):
    from toolkit.report_html import write_report_html

    paths, listening, _ = _tiny_run(tmp_path)
    page = write_report_html(paths, tmp_path / "out" / "report.html", listening=listening,
                             agreement={"chord_accuracy": 0.25, "tempo_match": True, "beat_alignment": 1.5,
                                        "note": "tiny"})
    text = page.read_text()
    # No network: nothing is fetched from anywhere; images and audio are data URIs.
    assert not re.search(r"(src|href)=['\"](https?:)?//", text)
    assert len(re.findall(r"<audio[^>]*src='data:audio/wav;base64,", text)) == 3
    assert "× real time" in text and "end to end ms (1 generation)" in text and "run id" in text
    assert "snake_case" not in text and "e2e_p50_ms" not in text
    # Two runs of one bundle are told apart by their run ids.
    ids = set(re.findall(r"<td>([0-9a-f]{10})</td>", text))
    assert len(ids) == len(paths)
    assert "Core ML runs only on macOS" in text
    assert oct(page.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_report_cli_names_a_bad_file_and_leaves_no_empty_dir(tmp_path, capsys):
    from toolkit.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_text("not json")
    out = tmp_path / "page"
    assert main(["report", str(bad), "--out", str(out)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not out.exists()


def test_report_html_in_headless_chromium(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium, as .ci/run does as root)")
    from toolkit.report_html import write_report_html

    paths, listening, _ = _tiny_run(tmp_path)
    page = write_report_html(paths, tmp_path / "out" / "report.html", listening=listening)
    probe_page = tmp_path / "out" / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    proc = subprocess.run([chromium, *flags, "--virtual-time-budget=20000", "--enable-logging=stderr", "--v=0",
                           "--dump-dom", probe_page.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r"<pre id=\"probe\">(.*?)</pre>", proc.stdout, re.S)
    assert m, f"the page did not finish loading in Chromium:\n{proc.stderr[-2000:]}"
    import html as html_mod

    probe = json.loads(html_mod.unescape(m.group(1)))
    console_errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and "ERROR" in ln.upper()
                      and "probe" not in ln]
    assert probe["errors"] == [] and console_errors == [], (probe["errors"], console_errors)
    assert len(probe["audio"]) == 3
    for a in probe["audio"]:
        assert a["error"] is None and a["duration"] and a["duration"] > 0, probe["audio"]
    assert probe["images"] and all(i["w"] > 0 and i["h"] > 0 for i in probe["images"]), probe["images"]
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1400,2400", "--hide-scrollbars", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000
