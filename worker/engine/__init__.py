"""The delivery engine: claim due rows, send them to /track, settle the outcomes, and what serves that."""
