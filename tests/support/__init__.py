"""The suite's harness, one import for every test module (and for bench/harness.py).

- servers: `DEBIAN_PG15`, `pg15_bin_dir`, `any_bin_dir`, `fresh_database`
- settings: `settings_for` (presets `QUICK`, `FAULTS`), `names_for`, `create_schema`,
  `as_role` (and the `loader` fixture in conftest.py: a role with no privileges)
- daemon: `run_in_process`, `running` (in this process), `daemon_args`, `spawn` (a child),
  `killed_and_restarted` (a child SIGKILLed, then run again), `run_cli`, `cdcfeed_command`,
  `clean_environment`
- waiting: `wait_until` (and `wait_until_blocking`), with `at_least` and `equals`
- observe: `http_get`, `answers_200`, `parse_metrics`, `fetchval`, `count_batches`,
  `wait_for_batches`
- oracle: `prepare_slot`, `read_stream`, `ledger_rows`, `check_invariant`, and for a load
  that updates and deletes, `check_changes`

What the harness takes from cdcfeed is imported in `product.py` only.
"""

from tests.support.daemon import (
    Daemon,
    cdcfeed_command,
    clean_environment,
    daemon_args,
    killed_and_restarted,
    one_error_line,
    run_cli,
    run_in_process,
    running,
    spawn,
)
from tests.support.observe import (
    Scrape,
    answers_200,
    count_batches,
    execute,
    fetchval,
    http_get,
    parse_metrics,
    wait_for_batches,
)
from tests.support.oracle import (
    PUBLICATION,
    Transaction,
    check_changes,
    check_invariant,
    ledger_rows,
    prepare_slot,
    read_stream,
)
from tests.support.product import PostgresCluster, free_port, wheel_bin_dir
from tests.support.servers import DEBIAN_PG15, any_bin_dir, fresh_database, pg15_bin_dir
from tests.support.settings import (
    FAULTS,
    QUICK,
    as_role,
    create_schema,
    names_for,
    settings_for,
)
from tests.support.waiting import at_least, equals, wait_until, wait_until_blocking

__all__ = [
    "DEBIAN_PG15",
    "FAULTS",
    "PUBLICATION",
    "QUICK",
    "Daemon",
    "PostgresCluster",
    "Scrape",
    "Transaction",
    "answers_200",
    "any_bin_dir",
    "as_role",
    "at_least",
    "cdcfeed_command",
    "check_changes",
    "check_invariant",
    "clean_environment",
    "count_batches",
    "create_schema",
    "daemon_args",
    "equals",
    "execute",
    "fetchval",
    "free_port",
    "fresh_database",
    "http_get",
    "killed_and_restarted",
    "ledger_rows",
    "names_for",
    "one_error_line",
    "parse_metrics",
    "pg15_bin_dir",
    "prepare_slot",
    "read_stream",
    "run_cli",
    "run_in_process",
    "running",
    "settings_for",
    "spawn",
    "wait_for_batches",
    "wait_until",
    "wait_until_blocking",
    "wheel_bin_dir",
]
