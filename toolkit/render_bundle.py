"""``python -m toolkit.render_bundle BUNDLE OUT.npy``: one generation by a bundle's own runtime.

Runs in its own process and imports only ``runtime_py`` (no torch, unless the target's runtime
links it): the vocal of reference example ``--example`` with its initial noise ``--seed-index``,
encoded, sampled and decoded exactly as ``runtime_py verify`` does, the audio saved as float32
``(channels, samples)``. ``toolkit run`` uses it for the listening section of ``report.html``: the
same vocal and seed through every bundle, beside the bundle's full-precision reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def render(bundle: Path, out: Path, *, example: int = 0, seed_index: int = 0) -> Path:
    import numpy as np

    from runtime_py.bundle import load_manifest, load_reference
    from runtime_py.verify import DevicePipeline

    manifest = load_manifest(bundle)
    inputs, _ = load_reference(bundle, manifest)
    pipe = DevicePipeline(bundle, manifest, threads=None)
    _, audio = pipe.generate(inputs["vocals"][example:example + 1], inputs["noise"][example, seed_index:seed_index + 1])
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.npy")
    np.save(tmp, np.asarray(audio[0], np.float32))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toolkit.render_bundle", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path, help=".npy file for the audio (channels, samples)")
    p.add_argument("--example", type=int, default=0, help="reference example (vocal) index")
    p.add_argument("--seed-index", type=int, default=0, help="reference initial-noise index")
    a = p.parse_args(argv)
    render(a.bundle, a.out, example=a.example, seed_index=a.seed_index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
