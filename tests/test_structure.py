"""The structure holds: import layers (import-linter), one target table per side that agree, a
fifth target added in one place reaching export, runtime_py and the matrix."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> Path:
    found = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(found).is_file():
        pytest.fail("lint-imports (import-linter) is not installed; it is in the dev extra")
    return Path(found)


def test_import_contracts_hold():
    proc = subprocess.run([str(_lint_imports()), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_every_toolkit_module_sits_in_a_layer():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    modules = {f"toolkit.{p.stem}" for p in (REPO / "toolkit").glob("*.py") if p.stem != "__init__"}
    modules |= {f"toolkit.{p.name}" for p in (REPO / "toolkit").iterdir()
                if p.is_dir() and (p / "__init__.py").is_file()}
    assert not sorted(modules - named), "toolkit modules outside every layer of pyproject.toml"


def test_no_import_cycle_between_packages():
    import grimp

    graph = grimp.build_graph("toolkit", "calibration", "targets", "runtime_py")
    for a, b in (("calibration", "targets"), ("calibration", "runtime_py"), ("targets", "runtime_py")):
        assert not (graph.chain_exists(importer=a, imported=b, as_packages=True)
                    and graph.chain_exists(importer=b, imported=a, as_packages=True)), f"{a} <-> {b}"
    # The cycle the review found: toolkit.bundle -> calibration.evaluate_plan -> toolkit.bundle.
    assert graph.find_shortest_chain(importer="calibration.evaluate_plan", imported="toolkit.bundle") is None
    for verb in ("toolkit.bundle", "toolkit.matrix", "toolkit.cli", "toolkit.pipeline_run"):
        assert not graph.chain_exists(importer="calibration", imported=verb, as_packages=True), verb
        assert not graph.chain_exists(importer="targets", imported=verb, as_packages=True), verb


def test_the_two_target_tables_agree():
    from runtime_py.runners import RUNTIMES
    from targets import TARGETS, get_target

    assert list(TARGETS) == list(RUNTIMES)
    for name, target in TARGETS.items():
        runtime = RUNTIMES[name]
        assert (runtime.name, runtime.file_suffix, runtime.distribution) == \
            (target.name, target.file_suffix, target.runtime_distribution), name
        module = get_target(name)
        assert (module.NAME, module.FILE_SUFFIX) == (name, target.file_suffix)
    workflow = (REPO / ".github/workflows/device-matrix.yml").read_text()
    for name in TARGETS:
        assert f"demo-{name}" in workflow, f"the device-matrix workflow never verifies a {name} bundle"


@pytest.fixture
def dummy_target(monkeypatch):
    from runtime_py import runners
    from targets import unregister_target

    monkeypatch.setenv(runners.PLUGINS_ENV, "tests.dummy_target")
    monkeypatch.setattr(runners, "_plugins_loaded", set())
    sys.modules.pop("tests.dummy_target", None)
    yield "dummy"
    unregister_target("dummy")
    sys.modules.pop("tests.dummy_target", None)


def test_a_fifth_target_added_in_one_place_reaches_export_verify_and_matrix(dummy_target, tmp_path,
                                                                               monkeypatch):
    from runtime_py.bundle import load_manifest
    from targets import target_names
    from tests.test_bundle import tiny_pipeline
    from toolkit.cli import build_parser
    from toolkit.matrix import run_matrix

    assert "dummy" in target_names()
    args = build_parser().parse_args(["export", "--target", "dummy", "--out", str(tmp_path / "x")])
    assert args.target == ["dummy"]

    # The verify subprocess inherits $ADM_EDGE_TARGET_PLUGINS and loads the plugin itself.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = run_matrix(tiny_pipeline(), tmp_path / "m", targets=("dummy",), runs=1, warmup=0, log=lambda m: None)
    bundle = Path(result["bundles"]["dummy"])
    assert bundle.name == "tiny-dummy"
    manifest = load_manifest(bundle)
    assert manifest["components"]["denoiser"]["path"] == "denoiser.donnx"
    assert manifest["components"]["denoiser"]["parity"]["runtime"] == "dummy"
    assert result["reports"]["dummy"]["status"] == "pass", result["reports"]["dummy"]["reason"]
    report = json.loads(Path(result["reports"]["dummy"]["path"]).read_text())
    assert report["target"] == "dummy"
    md = next((Path(v) for v in result["matrix"].values() if str(v).endswith(".md")), None)
    assert md is not None and "dummy" in md.read_text()
