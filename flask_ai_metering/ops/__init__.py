"""What the CLI runs: validate, cleanup, privacy, reconcile, reports and the schema."""
