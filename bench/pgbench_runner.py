"""pgbench running cdcfeed's batch protocol, for bench/rate.py: the floor of a small batch.

Each pgbench transaction is one batch, statement for statement what cdcfeed does for it:
open the IN_PROGRESS ledger row reading `pg_current_wal_insert_lsn()` (its own commit), then
one transaction recording `pg_current_xact_id()` in the row and inserting the orders, then
mark it COMPLETED with the end LSN (its own commit). Ids are random in a range so wide that
two batches of a run never meet, so no statement is spent on reserving them; cdcfeed reserves
its ids for several batches in one statement. pgbench's orders are built by the server
(`generate_series`), so its client generates and writes nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = """\
\\set bid random(1, 90000000000000)
\\set first :bid * :rows
\\set last :first + :rows - 1
INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id, start_lsn,
    feed_file) VALUES (:bid, 'pgbench', 'IN_PROGRESS', :rows, :first,
    pg_current_wal_insert_lsn(), '');
BEGIN;
UPDATE batch_control SET xid = pg_current_xact_id()
    WHERE batch_id = :bid AND status = 'IN_PROGRESS';
INSERT INTO orders (order_id, batch_id, customer_id, amount, created_at)
    SELECT g, :bid::bigint, 1 + (random() * 999)::int,
           round((10 + random() * 990)::numeric, 2), now()
    FROM generate_series(:first::bigint, :last::bigint) AS g;
COMMIT;
UPDATE batch_control SET status = 'COMPLETED', end_lsn = pg_current_wal_insert_lsn(),
    row_count = :rows, completed_at = now() WHERE batch_id = :bid AND status = 'IN_PROGRESS';
"""

_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def pgbench_batches_per_second(
    bin_dir: Path, dsn: str, workdir: Path, clients: int, seconds: float, rows: int
) -> float:
    """Batches per second pgbench completes with `clients` connections over `seconds`."""
    script = workdir / "ledger-protocol.sql"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [
            str(bin_dir / "pgbench"),
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={clients}",
            f"--jobs={min(clients, 2)}",  # the machine's cores
            f"--time={max(1, round(seconds))}",
            f"--define=rows={rows}",
            f"--file={script}",
            dsn,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    found = _TPS.search(result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr.strip()}")
    return float(found.group(1))
