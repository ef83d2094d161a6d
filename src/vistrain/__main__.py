"""`python -m vistrain VERB ...`: the same as the `vistrain` command."""

from vistrain.cli import main

raise SystemExit(main())
