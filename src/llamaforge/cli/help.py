"""``--help`` for config-driven commands: every setting with its default and meaning."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from llamaforge.config import help_text


class SettingsHelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions as usual; keeps texts with line breaks (the
    settings list of ``help_text``) as they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_config_help(
    parser: argparse.ArgumentParser, config_class: Callable[[], type], intro: str = ""
) -> None:
    """Give ``parser`` (made with ``add_help=False``) a ``-h/--help`` whose epilog is
    ``help_text`` of the config class that ``config_class()`` returns: the class is imported
    only when help is asked for, so listing commands stays cheap."""

    class _Help(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
            text = help_text(config_class(), intro)
            parser.epilog = f"{parser.epilog}\n\n{text}" if parser.epilog else text
            parser.formatter_class = SettingsHelpFormatter
            parser.print_help()
            parser.exit()

    parser.add_argument("-h", "--help", action=_Help, nargs=0, help="show this help and exit")
