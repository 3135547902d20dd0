"""One module per `cwpo` subcommand: a Config dataclass and a `run(cfg)` that reads top to bottom."""
