"""Batch-1 decode of the 8B shape with the K-major kernels' default stage cap patched per variant
(`pallas_kernels.quant_matmul_kmajor.MAX_STAGES`), in one process, same random weights, JAX's caches
cleared between variants (`batch1_row`). Each variant is METHOD:STAGES, METHOD int8 or int4, STAGES
the most tiles in flight a block (2 to 8); rows carry a digest of the greedy tokens, which the
variants of one method must share.

    PYTHONPATH=. python -m benchmarks.stages_ab int4:8 int4:4 int4:3 --out results.json
"""

from __future__ import annotations

import argparse
from unittest import mock

from benchmarks.quant_decode import ab_rows


def parse_variant(text: str) -> tuple[str, int]:
    method, _, stages = text.partition(":")
    if method not in ("int8", "int4") or stages not in {str(s) for s in range(2, 9)}:
        raise ValueError(f"{text!r} is not METHOD:STAGES with METHOD int8 or int4 and STAGES 2 to 8")
    return method, int(stages)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variants", nargs="+", help="METHOD:STAGES, e.g. int4:4")
    parser.add_argument("--out", default="results_stages_ab.json")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        parser.error(str(e))
    import pallas_kernels.quant_matmul_kmajor as q

    ab_rows([(f"{method}:{stages}", method, [mock.patch.object(q, "MAX_STAGES", {**q.MAX_STAGES, method: stages})],
              dict(method=method, max_stages=stages)) for method, stages in variants], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
