"""Everything the harness takes from cdcfeed, in one place: when the package moves things,
only this file changes."""

from cdcfeed.app import names_of, run_daemon
from cdcfeed.config import Settings, load_settings
from cdcfeed.embedded import PostgresCluster, free_port, wheel_bin_dir
from cdcfeed.endpoint import Endpoint
from cdcfeed.ledger import init_schema
from cdcfeed.lsn import lsn_to_int
from cdcfeed.proof.sources import pgoutput
from cdcfeed.sql import Names

__all__ = [
    "Endpoint",
    "Names",
    "PostgresCluster",
    "Settings",
    "free_port",
    "init_schema",
    "load_settings",
    "lsn_to_int",
    "names_of",
    "pgoutput",
    "run_daemon",
    "wheel_bin_dir",
]
