"""`python -m migrate`: the same as the `migrate` command."""

from migrate.cli import main

raise SystemExit(main())
