"""The proof of delivery: every batch the ledger settled reached the change stream whole.

A source (in `proof/sources/`, one module per kind of stream) turns what it reads into
`events.ChangeEvent`s and `events.TransactionEnd`s, which `fold` folds into
`events.Observation`s, one per transaction and batch, and `events.StreamEvent`s for changes
cdcfeed never makes; the source also tells how far it has read. `judge` turns those and the
ledger's `LedgerBatch`es into verdicts by the same rules for every source; `report` prints the
totals.
"""
