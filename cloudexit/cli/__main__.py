"""`python -m cloudexit.cli`."""

from cloudexit.cli import main

main()
