"""The development tools: a local /track receiver, the demo, and the embedded PostgreSQL."""
