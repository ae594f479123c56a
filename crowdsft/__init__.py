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


def __getattr__(name: str):
    # ``from crowdsft import hookimpl`` for plugin authors, without importing pluggy's
    # machinery (or anything else) before it is needed.
    if name == "hookimpl":
        from crowdsft.plugins.hookspecs import hookimpl

        return hookimpl
    if name in ("Node", "Receipt", "SubmitResult"):  # the contributor's SDK
        from crowdsft.node import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'crowdsft' has no attribute {name!r}")


__all__ = ["PROTOCOL", "Node", "Receipt", "SubmitResult", "__version__", "hookimpl"]
