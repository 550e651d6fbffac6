"""`python -m rfs` runs the command-line interface."""

from rfs.cli import main

raise SystemExit(main())
