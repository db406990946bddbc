"""The jobs: each a config dataclass and a short run(cfg). Only the CLI (launch/cli.py) imports them."""
