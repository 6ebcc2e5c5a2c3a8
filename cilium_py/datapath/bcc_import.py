"""Import BCC, which comes from Debian's python3-bpfcc and not from PyPI.

`make setup` links the package into the venv. When that link is missing (another venv, a
pyenv interpreter) the package is loaded by path, without putting every Debian module on
sys.path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")


class BccUnavailable(RuntimeError):
    """BCC cannot be imported; the message says how to install it."""


def import_bcc():
    try:
        import bcc  # noqa: PLC0415

        return bcc
    except ImportError:
        pass
    init = DEBIAN_BCC / "__init__.py"
    if not init.exists():
        raise BccUnavailable(
            "BCC is not installed: run `make setup` (it installs Debian's python3-bpfcc)"
        )
    spec = importlib.util.spec_from_file_location(
        "bcc", init, submodule_search_locations=[str(DEBIAN_BCC)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    spec.loader.exec_module(module)
    return module
