"""Reading a bundle on the device: the manifest, the sha256 of every file, the reference arrays.

A bundle defends itself: the manifest is sealed by ``manifest_sha256`` (the sha256 of its own
canonical JSON without that field), every file it lists by its sha256, and every component file
must carry the suffix its target's runtime reads. Any malformed, altered or inconsistent bundle is
a :class:`BundleError` that names the file and the field, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "toolkit_version", "model", "target", "precision", "runtime",
                 "sampler", "audio", "components", "files", "quality_budget", "reference")
COMPONENTS = ("vae_encoder", "denoiser", "vae_decoder")  # the deployable components, in run order
DIGEST_FIELD = "manifest_sha256"


class BundleError(ValueError):
    """A bundle is incomplete, altered or malformed; the message names the file and the field."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths), the manifest excepted."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace), its digest field excluded."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=float, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validate_manifest(manifest: dict, *, source: str) -> None:
    """Schema check of a manifest: required keys, the three components, a consistent sampler table."""
    try:
        _validate(manifest, source=source)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{source}: malformed manifest ({type(exc).__name__}: {exc}); re-export the "
                          "bundle") from None


def _validate(manifest: dict, *, source: str) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{source}: expected a JSON object, got {type(manifest).__name__}")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise BundleError(f"{source}: field '{key}' is missing; re-export the bundle")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{source}: field 'format_version' is {manifest['format_version']!r}; this "
                          f"runtime reads {FORMAT_VERSION}")
    if not isinstance(manifest["components"], dict):
        raise BundleError(f"{source}: field 'components' must be an object")
    for name in COMPONENTS:
        comp = manifest["components"].get(name)
        if comp is None:
            raise BundleError(f"{source}: components.{name} is missing")
        if not isinstance(comp, dict):
            raise BundleError(f"{source}: components.{name} must be an object")
        for key in ("path", "inputs", "outputs", "precision"):
            if key not in comp:
                raise BundleError(f"{source}: components.{name}.{key} is missing")
    _check_target_files(manifest, source=source)
    s = manifest["sampler"]
    if not isinstance(s, dict):
        raise BundleError(f"{source}: field 'sampler' must be an object")
    for key in ("t", "alpha", "sigma", "guidance", "guidance_folded", "steps", "denoiser_batch"):
        if key not in s:
            raise BundleError(f"{source}: sampler.{key} is missing")
    if not (len(s["t"]) == len(s["alpha"]) == len(s["sigma"]) == s["steps"] + 1):
        raise BundleError(f"{source}: sampler table lengths disagree with sampler.steps={s['steps']}")
    for i, (a, sg) in enumerate(zip(s["alpha"], s["sigma"])):
        if abs(a * a + sg * sg - 1.0) > 1e-6:
            raise BundleError(f"{source}: sampler row {i}: alpha² + sigma² = {a * a + sg * sg:.6f} ≠ 1")
    _check_attention(manifest, source=source)


ATTENTION_MODES = ("dense", "litefocus")


def attention_mode(manifest: dict) -> str:
    """The denoiser's global attention: 'dense' (bundles before the field was written are dense) or
    'litefocus' (its compensation indices an input, drawn per call: runtime_py.compensation)."""
    return (manifest.get("attention") or {}).get("mode", "dense")


def _check_attention(manifest: dict, *, source: str) -> None:
    """A LiteFocus bundle's ``attention.compensation`` is drawable and names an int64 denoiser input."""
    att = manifest.get("attention")
    if att is None:
        return
    if not isinstance(att, dict) or att.get("mode") not in ATTENTION_MODES:
        raise BundleError(f"{source}: field 'attention.mode' must be one of {ATTENTION_MODES}, got "
                          f"{att.get('mode') if isinstance(att, dict) else att!r}")
    if att["mode"] != "litefocus":
        return
    from runtime_py.compensation import CompensationDraw

    record = att.get("compensation")
    if not isinstance(record, dict):
        raise BundleError(f"{source}: field 'attention.compensation' is missing; a LiteFocus bundle says how "
                          "its compensation indices are drawn — re-export the bundle")
    try:
        draw = CompensationDraw(record, source=source)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    inputs = {i["name"]: i for i in manifest["components"]["denoiser"]["inputs"]}
    spec = inputs.get(draw.input)
    if spec is None or spec.get("dtype") != "int64" or list(spec.get("shape", [])) != [draw.count]:
        raise BundleError(f"{source}: attention.compensation.input {draw.input!r} must be an int64 "
                          f"[{draw.count}] input of components.denoiser.inputs, got {spec}")


def _check_target_files(manifest: dict, *, source: str) -> None:
    """The target is one this runtime knows, and every component file is of that target's kind."""
    from runtime_py.runners import runtimes

    target, known = manifest["target"], runtimes()
    if target not in known:
        raise BundleError(f"{source}: field 'target' is {target!r}; this runtime knows "
                          f"{', '.join(sorted(known))}")
    suffix = known[target].file_suffix
    for name in COMPONENTS:
        path = str(manifest["components"][name]["path"])
        if not path.endswith(suffix):
            raise BundleError(f"{source}: components.{name}.path is {path!r}, but a {target} bundle's "
                              f"components are {suffix} files; the 'target' field and the files disagree "
                              "(re-export the bundle for the target you mean)")


def load_manifest(bundle: Path, *, check_hashes: bool = True) -> dict:
    """Load and validate ``bundle/manifest.json``; with ``check_hashes`` every file's sha256 too."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: not found; is {bundle} a bundle written by `toolkit export`?")
    try:
        manifest = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8 text; not a manifest written by `toolkit export`") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    validate_manifest(manifest, source=str(path))
    if DIGEST_FIELD not in manifest:
        raise BundleError(f"{path}: field '{DIGEST_FIELD}' is missing; re-export the bundle with this "
                          "toolkit (older bundles are not sealed)")
    if manifest[DIGEST_FIELD] != manifest_digest(manifest):
        raise BundleError(f"{path}: field '{DIGEST_FIELD}' does not match the manifest's content; the "
                          "manifest was edited or corrupted after export — re-copy or re-export the bundle")
    if check_hashes:
        actual = hash_tree(bundle)
        for rel, digest in manifest["files"].items():
            if rel not in actual:
                raise BundleError(f"{bundle / rel}: listed in the manifest but missing; re-copy the bundle")
            if actual[rel] != digest:
                raise BundleError(f"{bundle / rel}: sha256 mismatch (manifest {digest[:12]}…, file "
                                  f"{actual[rel][:12]}…); the file was altered or corrupted in transit")
        extra = sorted(set(actual) - set(manifest["files"]))
        if extra:
            raise BundleError(f"{bundle / extra[0]}: not listed in the manifest ({len(extra)} unlisted)")
    return manifest


def load_reference(bundle: Path, manifest: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, outputs) of the bundle's full-precision reference."""
    ref = manifest["reference"]
    with np.load(Path(bundle) / ref["inputs"]) as f:
        inputs = {k: f[k] for k in f.files}
    with np.load(Path(bundle) / ref["outputs"]) as f:
        outputs = {k: f[k] for k in f.files}
    return inputs, outputs
