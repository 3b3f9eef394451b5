"""Batch-1 decode of the 8B shape with the K-major kernels' upcast loads against their byte-pair
loads (`pallas_kernels.quant_matmul_kmajor.UPCAST_KINDS` without the kind), in one process, same
random weights, JAX's caches cleared between variants (else a variant reuses the last one's compiled
step: the kernel plan is fixed when the step is traced). Each variant is METHOD=0 (old load) or
METHOD=1 (upcast load), METHOD int8 or int4, or int4=2 (upcast load and the folded conversion,
`INT4_FOLDED`: the committed kernel; int4=0 and int4=1 run Mosaic GPU's conversion). Rows carry a
digest of the greedy tokens, which the variants of one method must share.

    PYTHONPATH=. python -m benchmarks.upcast_ab int4=0 int4=1 int4=2 int8=0 int8=1 --out results.json
"""

from __future__ import annotations

import argparse
from unittest import mock

from benchmarks.quant_decode import ab_rows


def parse_variant(text: str) -> tuple[str, int]:
    method, _, flag = text.partition("=")
    if method not in ("int8", "int4") or flag not in (("0", "1", "2") if method == "int4" else ("0", "1")):
        raise ValueError(f"{text!r} is not int8=0, int8=1, int4=0, int4=1 or int4=2")
    return method, int(flag)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variants", nargs="+", help="int8=0, int8=1, int4=0, int4=1 or int4=2")
    parser.add_argument("--out", default="results_upcast_ab.json")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        parser.error(str(e))
    import pallas_kernels.quant_matmul_kmajor as q

    runs = []
    for method, flag in variants:
        kinds = q.UPCAST_KINDS | {method} if flag else q.UPCAST_KINDS - {method}
        patches = [mock.patch.object(q, "UPCAST_KINDS", frozenset(kinds)), mock.patch.object(q, "INT4_FOLDED", flag == 2)]
        runs.append((f"{method}={flag}", method, patches, dict(method=method, upcast_load=bool(flag),
                                                                 int4_folded=flag == 2)))
    ab_rows(runs, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
