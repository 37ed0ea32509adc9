"""cdcfeed: rate-controlled synthetic order load with an LSN ledger that proves CDC delivery."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cdcfeed")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
