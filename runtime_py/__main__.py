"""Command line of the device runtime: ``python -m runtime_py verify BUNDLE [options]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# Exit status of `verify`: the bundle passed its budget, failed it (or is malformed), or this host
# cannot run its target (0 instead with --allow-unavailable).
EXIT_PASS, EXIT_FAIL, EXIT_UNAVAILABLE = 0, 1, 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime_py",
                                description="Run and judge an adm-edge bundle on this device (no torch).")
    sub = p.add_subparsers(dest="verb", required=True)
    v = sub.add_parser("verify", help="run the bundle, time it, compare with its reference")
    v.add_argument("bundle", type=Path)
    v.add_argument("--runs", type=int, default=5, help="timed runs after warm-up (more: steadier p90)")
    v.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    v.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    v.add_argument("--out", type=Path, default=None, help="report JSON (default: BUNDLE/../<name>.report.json)")
    v.add_argument("--runner", choices=("native", "python"), default=None,
                   help="native: the adm-run binary (ExecuTorch bundles; no torch needed); python: the "
                        "target's Python runtime (default: native where it applies and is built)")
    v.add_argument("--allow-unavailable", action="store_true",
                   help=f"exit 0 when this host cannot run the bundle's target (default: exit "
                        f"{EXIT_UNAVAILABLE}, so a CI leg that lacks its runtime is not green)")
    args = p.parse_args(argv)

    from runtime_py.verify import verify, write_report

    report = verify(args.bundle, runs=args.runs, warmup=args.warmup, threads=args.threads,
                    runner=args.runner)
    out = args.out or args.bundle.parent / f"{args.bundle.name}.report.json"
    write_report(report, out)
    e2e = report.get("end_to_end") or {}
    agg = (report.get("quality") or {}).get("aggregate") or {}
    print(json.dumps({"status": report["status"], "reason": report["reason"], "report": str(out),
                      "runner": report.get("runner"),
                      "e2e_p50_ms": e2e.get("p50_ms"), "real_time_factor": e2e.get("real_time_factor"),
                      "latent_snr_db": agg.get("latent_snr_db")}, indent=2))
    if report["status"] == "unavailable":
        return 0 if args.allow_unavailable else EXIT_UNAVAILABLE
    return EXIT_PASS if report["status"] == "pass" else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
