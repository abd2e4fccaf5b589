"""`python -m lmedit.cli ...` (e.g. under torchrun) runs the command line."""

from lmedit.cli import main

main()
