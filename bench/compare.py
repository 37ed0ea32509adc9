"""Before and after: the daemons of two (or more) source trees, side by side on one server.

Each tree's `cdcfeed run` loads the same batches in turn, repetition after repetition, from
empty tables: large batches (10,000 rows, concurrency 2) and small ones (100 rows,
concurrency 8, flat out). Printed per tree: rows or batches per second end to end (from the
ledger) and the CPU per batch of the daemon and of the server, medians of the repetitions,
and each tree's ratio to the first. Example, a checkout of the previous release beside this
one:

    git worktree add /tmp/before v1.2.0
    .venv/bin/python bench/compare.py --tree before=/tmp/before --tree after=. --repeat 3

The trees share this checkout's virtual environment; each daemon imports the package from
its own tree's `daemon/` (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from cdcfeed.embedded import PostgresCluster
from harness import (
    CpuMeter,
    Daemon,
    create_database,
    empty_tables,
    ledger_span,
    median,
    private_server,
    spread,
)


@dataclass(frozen=True)
class Shape:
    name: str
    batch_size: int
    concurrency: int
    batches: int


@dataclass(frozen=True)
class Run:
    per_second: float  # rows/s for large batches, batches/s for small ones
    daemon_cpu_ms: float  # per batch
    server_cpu_ms: float


async def run_tree(cluster: PostgresCluster, dsn: str, root: Path, tree: Path, shape: Shape) -> Run:
    await empty_tables(dsn)
    os.environ["PYTHONPATH"] = str(tree / "daemon")
    daemon = Daemon.start(
        dsn,
        root,
        f"{shape.name}-{tree.name}",
        "--rate",
        "100000",
        "--batch-size",
        str(shape.batch_size),
        "--concurrency",
        str(shape.concurrency),
        "--max-batches",
        str(shape.batches),
    )
    await daemon.wait_ready()
    meter = CpuMeter(cluster)
    meter.start(running=daemon.process.pid)
    code = await daemon.wait(timeout=900)
    _, server, client = meter.stop()
    if code != 0:
        raise RuntimeError(f"the daemon of {tree} exited {code}; see {daemon.log}")
    span = await ledger_span(dsn)
    rate = span.rows_per_second if shape.batch_size >= 1000 else span.batches_per_second
    return Run(rate, client / span.batches * 1e3, server / span.batches * 1e3)


async def main(args: argparse.Namespace) -> None:
    trees: list[tuple[str, Path]] = args.tree
    shapes = [
        Shape("large", 10_000, 2, args.large_batches),
        Shape("small", 100, 8, args.small_batches),
    ]
    runs: dict[tuple[str, str], list[Run]] = {}
    with private_server() as (cluster, root):
        dsn = await create_database(cluster)
        for repetition in range(args.repeat):
            for shape in shapes:
                # Rotate the order, so neither tree always runs first.
                order = trees[repetition % len(trees) :] + trees[: repetition % len(trees)]
                for name, tree in order:
                    run = await run_tree(cluster, dsn, root, tree, shape)
                    runs.setdefault((shape.name, name), []).append(run)
                    print(
                        f"  repetition {repetition + 1} {shape.name} {name}: "
                        f"{run.per_second:,.0f}/s, daemon {run.daemon_cpu_ms:.3f} ms/batch, "
                        f"server {run.server_cpu_ms:.3f} ms/batch",
                        flush=True,
                    )
    for shape in shapes:
        unit = "rows/s" if shape.batch_size >= 1000 else "batches/s"
        print(
            f"{shape.name} batches ({shape.batch_size} rows, concurrency {shape.concurrency}, "
            f"{shape.batches} batches), medians of {args.repeat}:"
        )
        first = [r.per_second for r in runs[(shape.name, trees[0][0])]]
        for name, _ in trees:
            these = runs[(shape.name, name)]
            rates = [r.per_second for r in these]
            ratios = [a / b for a, b in zip(rates, first, strict=True)]
            print(
                f"  {name:>10}: {median(rates):,.0f} {unit} {spread(rates, 1, 0)}, "
                f"/ {trees[0][0]} {median(ratios):.3f} {spread(ratios, 1, 3)}; CPU per batch: "
                f"daemon {median([r.daemon_cpu_ms for r in these]):.3f} ms, "
                f"server {median([r.server_cpu_ms for r in these]):.3f} ms"
            )


def _tree(given: str) -> tuple[str, Path]:
    name, _, path = given.partition("=")
    return name, Path(path).resolve()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tree",
        action="append",
        required=True,
        type=_tree,
        help="NAME=DIR of a source tree (twice or more)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large-batches", type=int, default=150, help="10,000-row batches")
    parser.add_argument("--small-batches", type=int, default=6000, help="100-row batches")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
