"""The load path: a scheduler fires batch runs at the configured rate, and each batch goes
through the ledger protocol (`batch.py`), from generated rows to a COMPLETED or FAILED row."""
