"""What every script in ``scripts/`` shares: run its ``main`` and turn the package's known errors into one line on
stderr and an exit status, never a traceback.

Exit status (the convention of every script):

- ``0``: done.
- ``1``: a failure while running: a data file that cannot be read, bad samples in a dataset, a Hub that cannot
  be reached or refuses the push, images that could not be predicted.
- ``2``: a usage error, a bad argument value found before any work starts (:class:`~cpsl_hf.utils.UsageError`
  and the ``usage_errors`` a script adds): a path that does not exist, a folder that is not a model or not a
  dataset, a model whose number of classes disagrees with the data, an empty input folder, an impossible
  option value. ``argparse`` exits 2 for its own usage errors too.

The line is ``error: <message>``; the library's messages name the argument (``--model PATH: ...``). Errors the
package does not raise on purpose (bugs) keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from cpsl_hf.utils import MissingPathError, UsageError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "MissingPathError", "UsageError", "error_line", "run"]

EXIT_FAILURE = 1
EXIT_USAGE = 2


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message's lines are joined with ``; ``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error: " + ("; ".join(lines) or type(error).__name__)


def run(
    main: Callable[[Sequence[str] | None], Any],
    argv: Sequence[str] | None = None,
    usage_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Call ``main(argv)`` and return the exit status: ``main``'s own when it returns an int, else 0; 2 after
    a usage error, 1 after a failure (``OSError``, ``ValueError``, ``RuntimeError``), each with one line on
    stderr. Use as ``sys.exit(run(main))``."""
    try:
        status = main(argv)
    except (UsageError, *usage_errors) as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, RuntimeError) as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_FAILURE
    return status if isinstance(status, int) else 0
