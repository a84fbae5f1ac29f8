"""The processes `sdloop serve` and `sdloop ingest` run, and serving's subcommands: each wires
the rooms below it (gateway, versions, engine) into one process."""
