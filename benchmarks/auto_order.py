"""``python -m benchmarks.auto_order``: derive ``auto``'s order (vqfast/auto_order.json) from the
committed benchmark results (benchmarks/results/*.json).

The rule, per device type and registry op:

- the results: every ``results/*.json`` of that device type, except quick runs (``*-quick.json``: tiny
  shapes timed once); their op rows count for the registry op they time: ``spatial_norm_act`` for
  ``group_norm_act`` (its lowering), ``vector_quantize+bwd`` for ``vector_quantize``;
- a backend enters the order when, on every case of the op where the runner asked it to run, it ran and
  was faster than eager (a lower median); one that failed or declined any case does not enter (the
  runner reports a decline as a failure, with the reason); where it was not asked (unavailable on that
  machine, or without the op) it counts neither way;
- the order is fastest first, by the geometric mean over those cases of the speedup over eager;
- ``torch`` is never listed: ``auto`` ends at it. An op measured on a device with no backend faster than
  eager has an empty order; an op never measured there is absent (``auto`` runs it on torch).

``--check`` exits 1, printing the difference, when the file differs from what the results give.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from vqfast.backend import AUTO_ORDER_FILE, BACKENDS, OPS

RESULTS_DIR = Path(__file__).with_name("results")
REGISTRY_OP = {"spatial_norm_act": "group_norm_act", "vector_quantize+bwd": "vector_quantize"}
COMMENT = (
    "Derived from benchmarks/results/ by `python -m benchmarks.auto_order` (the rule: its docstring): per "
    "device type and op, the backends measured faster than eager on every case, fastest first; torch ends every order."
)


def registry_op(op: str) -> str:
    """The registry op a benchmark case's op times: ``spatial_norm_act`` -> ``group_norm_act``."""
    return REGISTRY_OP.get(op, op)


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """The committed full runs of the runner (not --quick, not other records such as the resource
    table), oldest name first."""
    paths = sorted(p for p in results_dir.glob("*.json") if not p.name.endswith("-quick.json"))
    results = [json.loads(p.read_text()) for p in paths]
    return [r for r in results if isinstance(r, dict) and "ops" in r and "device_type" in r.get("meta", {})]


def derive(results: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """device type -> op -> the backends ``auto`` tries before torch, fastest first (the module's rule)."""
    # (device, op) -> backend -> speedups over eager, one per case it ran; None marks a failure.
    speedups: dict[tuple[str, str], dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        device = result["meta"]["device_type"]
        cases: dict[tuple, dict[str, float]] = defaultdict(dict)
        for row in result["ops"]:
            cases[(row["op"], row["shape"], row["dtype"], row["layout"])][row["impl"]] = row["median_ms"]
        for (op, *_), medians in cases.items():
            if registry_op(op) not in OPS or "eager" not in medians:
                continue
            for impl, median in medians.items():
                if impl.startswith("vqfast[") and impl.endswith("]"):
                    speedups[device, registry_op(op)][impl[7:-1]].append(medians["eager"] / median)
        for skipped in result["skipped"]:
            name = skipped["impl"][7:-1] if skipped["impl"].startswith("vqfast[") else None
            if name in BACKENDS and skipped["reason"].startswith("failed:"):
                for label in skipped["cases"]:
                    op = label.split()[0]
                    if registry_op(op) in OPS:
                        speedups[device, registry_op(op)][name].append(None)
        for op in {registry_op(op) for op, *_ in cases} & set(OPS):
            speedups[device, op]  # measured: listed, even with no backend faster than eager
    order: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for (device, op), per_backend in speedups.items():
        faster = {
            name: math.exp(sum(map(math.log, values)) / len(values))
            for name, values in per_backend.items()
            if name != "torch" and all(v is not None and v > 1 for v in values)
        }
        order[device][op] = sorted(faster, key=faster.get, reverse=True)
    return {device: {op: order[device][op] for op in OPS if op in order[device]} for device in sorted(order)}


def render(order: dict[str, dict[str, list[str]]]) -> str:
    """The file's text: the comment, then one line per op."""
    devices = ",\n".join(
        f'    "{device}": {{\n'
        + ",\n".join(f'      "{op}": {json.dumps(names)}' for op, names in ops.items())
        + "\n    }"
        for device, ops in order.items()
    )
    return f'{{\n  "_comment": {json.dumps(COMMENT)},\n  "order": {{\n{devices}\n  }}\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_order", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare: exit 1 when the file differs")
    args = parser.parse_args(argv)
    text = render(derive(load_results()))
    current = AUTO_ORDER_FILE.read_text() if AUTO_ORDER_FILE.exists() else ""
    if args.check:
        if text != current:
            print(f"{AUTO_ORDER_FILE} differs from what benchmarks/results/ give:\n{text}", file=sys.stderr)
            return 1
        return 0
    AUTO_ORDER_FILE.write_text(text)
    print(f"wrote {AUTO_ORDER_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
