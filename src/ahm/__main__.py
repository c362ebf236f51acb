"""`python -m ahm ...`: the same command line as the `ahm` script."""

from ahm.cli import main

main()
