"""fp-outbox's delivery daemon: claim due rows, send them to /track, settle the outcomes."""
