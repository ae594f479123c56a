"""Plot helpers shared by the sweep and the report: matplotlib, headless, loaded on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crowdsft.errors import CrowdSFTError


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError:
        raise CrowdSFTError(
            "plots need matplotlib: pip install 'crowd-sft[sim]' (or run the sweep with --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
