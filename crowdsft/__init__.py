"""Crowd-SFT: crowdsourced supervised fine-tuning of LLMs.

The import root of the project. Heavy libraries (torch, transformers) are never imported here:
``crowdsft --help`` and every ``crowdsft node ...`` command must start fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crowd-sft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

PROTOCOL = "crowdsft.v1"

__all__ = ["PROTOCOL", "__version__"]
