"""Everything the harness takes from cdcfeed, in one place: when the package moves things,
only this file changes."""

from cdcfeed.app import run_daemon
from cdcfeed.config import Settings, load_settings
from cdcfeed.database import Names, names_of
from cdcfeed.database.schema import init_schema
from cdcfeed.embedded import LOGICAL_SETTINGS, PostgresCluster, free_port, wheel_bin_dir
from cdcfeed.endpoint import Endpoint
from cdcfeed.lsn import lsn_to_int
from cdcfeed.proof.slot import pgoutput

__all__ = [
    "LOGICAL_SETTINGS",
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
