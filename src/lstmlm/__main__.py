"""The `lstmlm` command and `python -m lstmlm`."""

import os
import sys


def run() -> int:
    try:  # torch loads here: a Ctrl-C during its import is reported as one later would be
        from .cli import main
        from .distributed import launched_world_size
    except KeyboardInterrupt:
        print("lstmlm: interrupted", file=sys.stderr)
        return 130
    code = main()
    if launched_world_size() > 1:
        # A data-parallel rank that gets here has done its work and left its process group.
        # Skip the interpreter's teardown: there gloo's I/O threads can, rarely, abort the
        # process ("terminate called without an active exception"), and torchrun would report
        # a finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
