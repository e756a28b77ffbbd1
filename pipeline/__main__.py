"""`python -m pipeline` is the `nic` command."""

from .cli import main

main()
