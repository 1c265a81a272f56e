"""The command line: one thin command per verb over `cloudexit.app` and the library.

The only package that imports click and tqdm. `main` (cloudexit.cli.group) is the group; each
module below adds its commands to it. Library errors become messages and exit codes in one
place (`CloudexitGroup.invoke`).
"""

from __future__ import annotations

from cloudexit.cli.group import (EXAMPLES, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL,
                                EXIT_USAGE, db_option, examples, main, output_options, source_options)

_examples = examples  # the name command modules written before the split import

# The commands, registered on `main` when imported.
from cloudexit.cli import audit, decommission, inventory, migrate, plan, run, status, verify  # noqa: F401,E402
from cloudexit.cli import evidence as _evidence  # noqa: E402,F401 - link-report, serve

__all__ = ["EXAMPLES", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "db_option",
           "examples", "main", "output_options", "source_options"]

if __name__ == "__main__":  # pragma: no cover
    main()
