"""`python -m omnistream.cli ...` is the `omnistream` command."""

from . import main

raise SystemExit(main())
