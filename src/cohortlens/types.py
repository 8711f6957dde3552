"""Names shared by every layer. It imports nothing from cohortlens."""

from __future__ import annotations

import os

PathLike = str | os.PathLike
"""Any path argument a library function accepts."""

ALL_REGIONS = "all"
"""The region value that means "every region together" (one embedding or map across regions)."""
