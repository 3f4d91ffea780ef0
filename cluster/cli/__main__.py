"""`python -m omnistream.cluster.cli ...` is the `omnistream` command."""
from . import main

raise SystemExit(main())
