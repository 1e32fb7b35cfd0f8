"""``python -m photd``: the same command line as the ``photd`` console script."""

from photd.cli import main

raise SystemExit(main())
