"""The ``crowdsft`` command: one entry point, with groups for each role.

Heavy modules are imported inside the commands that use them, so ``crowdsft --help`` and the
node commands start fast.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import click

from crowdsft import __version__, progress
from crowdsft.errors import CrowdSFTError


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose < 2:
        logging.getLogger("grpc").setLevel(logging.WARNING)
        # Deprecation chatter from inside the ML libraries is not the user's business.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantisation bar; we say more


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class CrowdSFTGroup(click.Group):
    """Turns CrowdSFTError into a clean one-line message and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CrowdSFTError as exc:
            progress.clear()
            if exc.__cause__ is not None:  # the original traceback, for -vv
                logging.getLogger("crowdsft").debug("caused by", exc_info=exc.__cause__)
            click.secho(f"error: {exc}", err=True, fg="red")
            ctx.exit(exc.exit_code)


@click.group(cls=CrowdSFTGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crowdsft")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr (no progress)."
)
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Crowd-SFT: crowdsourced supervised fine-tuning of LLMs.

    Contributors run `crowdsft node ...` to sign and submit examples; operators run
    `crowdsft coordinator ...` to collect them and run fine-tuning rounds.
    """
    setup_logging(verbose, quiet)
    ctx.ensure_object(dict)["quiet"] = quiet
    # progress lines where a person watches: a terminal, and not --quiet
    progress.install(progress.TerminalProgress() if stderr_is_terminal() and not quiet else None)


def _register_commands() -> None:
    from crowdsft.coordinator.cli import coordinator
    from crowdsft.demo.cli import demo, experiment
    from crowdsft.demo.quickstart import quickstart
    from crowdsft.experiment.cli import crowd, fit_goemotions, paper_llm
    from crowdsft.node.cli import node
    from crowdsft.plugins.cli import embed, plugins
    from crowdsft.simulation.cli import data, simulate, sweep

    main.add_command(node)
    main.add_command(coordinator)
    main.add_command(quickstart)
    main.add_command(simulate)
    main.add_command(sweep)
    main.add_command(data)
    main.add_command(plugins)
    main.add_command(demo)
    main.add_command(experiment)
    main.add_command(embed)
    experiment.add_command(paper_llm)
    experiment.add_command(crowd)
    experiment.add_command(fit_goemotions)


_register_commands()

if __name__ == "__main__":
    main()
