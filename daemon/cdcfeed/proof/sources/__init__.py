"""Sources: each turns what one change stream carries into the records of `proof.events`."""
