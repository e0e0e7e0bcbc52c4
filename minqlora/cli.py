"""The `minqlora` command: parse the flags (cli_args.py), run the subcommand (cli_commands.py), report errors.

User errors — a bad flag value, a missing or corrupt file, an output that already exists — exit with status 2 and
ONE line naming the flag or file, with a pointer to --help, never a traceback; `--traceback` (before the
subcommand) shows it anyway. Ctrl-C exits with 130 and SIGTERM with 143, finetune first saving a checkpoint
(sft_state.Interrupt).

`minqlora --help` must answer at once, so this file and cli_args.py import neither torch nor the package's other
modules; cli_commands.py (which does) is imported once a subcommand is named. That is the package's one deferred
import, and it is deliberate: importing torch takes 2-13 s on this project's 2-core machines.

Leaves out: the flags (cli_args.py) and what the subcommands do (cli_commands.py).
"""

from __future__ import annotations

import importlib
import sys

from . import cli_args

# Exceptions that mean "the input is wrong", not "minqlora is broken": reported as one line, exit 2.
USER_ERRORS = (OSError, ValueError, ImportError)


def one_line(e: BaseException) -> str:
    """The message of a user error on one line; an OSError as "<file>: <reason>" (not "[Errno 17] ...")."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = importlib.import_module(".cli_commands", __package__) if cli_args.command_in(argv) else None
    parser = cli_args.build_parser(commands.TRAIN_DEFAULTS if commands else None)
    args = parser.parse_args(argv)  # argument errors: one line and exit 2 (cli_args._Parser)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    prog = f"minqlora {args.command}"
    try:
        commands.COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        message = str(e) or "interrupted"
        print(f"\n{prog}: {message}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except (commands.UsageError, *USER_ERRORS) as e:
        if args.traceback:
            raise
        print(f"{prog}: error: {one_line(e)} (see '{prog} --help')", file=sys.stderr)
        return 2
    return 0
