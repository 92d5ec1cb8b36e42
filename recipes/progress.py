"""Progress bars for long jobs (tqdm, which transformers already installs)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, disable: bool = False):
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr)
