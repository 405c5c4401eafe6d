"""`python -m nestlearn.train` / `torchrun ... -m nestlearn.train`: the `nestlearn train` command."""

from .command import main

main()
