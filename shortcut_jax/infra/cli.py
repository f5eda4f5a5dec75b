"""Command-line helpers shared by the package's entry points (``python -m shortcut_jax.<command>``).

No project imports: the entry points of every layer (the FID statistics command included) use it.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys

# A traceback for every error, user errors included: ``--debug`` on any command, or this variable.
DEBUG_ENV = "SHORTCUT_JAX_DEBUG"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Raised for bad input where the package raises them; from inside a library they are bugs.
_INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,
    ConnectionError,
)


# INFO lines of these libraries (orbax logs every file of every save and restore) are dropped.
QUIET_LIBRARIES = ("orbax", "tensorstore", "etils")


class _QuietLibraries(logging.Filter):
    """Drops the chatty libraries' lines below WARNING, and JAX's note that no TPU runtime could
    be loaded (every machine without TPUs logs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and any(f in record.pathname for f in QUIET_LIBRARIES):
            return False
        if record.pathname.endswith("xla_bridge.py") and record.levelno < logging.ERROR:
            message = str(record.msg) % record.args if record.args else str(record.msg)
            return "libtpu" not in message and "backend 'tpu'" not in message
        return True


def quiet_logs() -> None:
    """:class:`_QuietLibraries` on absl's handler and the root logger's handlers."""
    from absl import logging as absl_logging

    handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
    for handler in handlers:
        if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
            handler.addFilter(_QuietLibraries())


class UserError(Exception):
    """An error the user fixes (a flag, a file): printed as its message alone."""


def last_override_wins(argv: list[str], names: tuple[str, ...] = ("config",)) -> list[str]:
    """``argv`` with each ``--<name>.<key>`` override given more than once kept at its last place.

    absl keeps the last value of a repeated flag, but ml_collections appends a repeated tuple
    override to the earlier one (``--config.eval.budgets=(1,4)`` then ``--config.eval.budgets=(8,)``
    gives ``(1, 4, 8)``). Dropping the earlier occurrences gives every type absl's rule, so a
    script can put defaults first and let its caller's flags replace them. Both ``--k=v`` and
    ``--k v`` are understood, and ``--no<name>.<key>`` is the same key as ``--<name>.<key>``;
    everything after ``--`` is left alone. Each dropped override is reported on stderr.
    """
    groups: list[tuple[str | None, list[str]]] = []  # (override key or None, its tokens)
    rest = list(argv[1:])
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            groups.append((None, rest[i:]))
            break
        flag, has_value, _ = token.partition("=")
        key = None
        for name in names:
            if flag.startswith(f"--{name}.") or flag.startswith(f"--no{name}."):
                key = flag[flag.index(f"{name}.") :]
                break
        take = 1
        if (
            key is not None
            and not has_value
            and not flag.startswith("--no")
            and i + 1 < len(rest)
            and not rest[i + 1].startswith("--")
        ):
            take = 2  # '--config.key value'
        groups.append((key, rest[i : i + take]))
        i += take
    last = {key: n for n, (key, _) in enumerate(groups) if key is not None}
    out = list(argv[:1])
    for n, (key, tokens) in enumerate(groups):
        if key is not None and last[key] != n:
            print(f"{' '.join(tokens)} is replaced by a later {' '.join(groups[last[key]][1])}", file=sys.stderr)
            continue
        out += tokens
    return out


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is the package's (or an experiment
    file's) code, not a library's."""
    tb = err.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return path.startswith(_PACKAGE_DIR + os.sep) or os.sep + "experiments" + os.sep in path


def user_message(err: BaseException) -> str | None:
    """The message to print for a user error, None for a bug (shown with its traceback)."""
    if isinstance(err, UserError):
        return str(err)
    if type(err).__module__.startswith("shortcut_jax") and isinstance(err, _INPUT_ERRORS):
        return str(err)  # the package's own error classes (ConfigError, WeightsError, ...)
    text = str(err)
    if isinstance(err, OSError) and "Configuration is not available" in text:  # ml_collections' deferred load error
        return "--config: " + text.split("load:", 1)[-1].strip().replace("\n", " ")
    if isinstance(err, _INPUT_ERRORS) and _raised_here(err):
        return text
    return None


def _unescape(text: str) -> str:
    """ml_collections wraps a KeyError's text (a repr) in an AttributeError: the text itself."""
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            return str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return text


def _override_named(argv: list[str], key: str, names: tuple[str, ...]) -> str:
    """The ``--<name>.<...key>=value`` token of ``argv`` whose last key part is ``key``."""
    for token in argv:
        for name in names:
            if token.startswith(f"--{name}.") and token.partition("=")[0].rsplit(".", 1)[-1] == key:
                return token
    return f"--{names[0]}.<key>"


def _flag_error_message(err: BaseException, argv: list[str], names: tuple[str, ...]) -> str:
    text = _unescape(str(err))
    if "Traceback (most recent call last)" in text:  # a config file's get_config raised: its last line
        flag = text.split(": Error whilst parsing", 1)[0].removeprefix("flag ")
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        last = re.sub(r"^[\w.]*(Error|Exception)\w*: ", "", last)
        return f"{flag}: {last}"
    if isinstance(err, (AttributeError, KeyError)):  # a misspelt --config.<key> override
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        key = lines[0].strip("'\"") if lines else "?"
        hint = " ".join(lines[1:])
        return f"{_override_named(argv, key, names)}: the config has no key {key!r}" + (f". {hint}" if hint else "")
    required = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", text)
    if required:
        return f"--{required.group(1)} is required: give --{required.group(1)}=..."
    return " ".join(line.strip() for line in text.splitlines() if line.strip()).removeprefix("flag ")


def _missing_config_file(argv: list[str]) -> str | None:
    """A message naming the ``--config`` file when it does not exist (before any flag is parsed)."""
    for i, token in enumerate(argv):
        if token.startswith("--config="):
            value = token.split("=", 1)[1]
        elif token == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path = value.split(":", 1)[0]
        if path and not os.path.exists(path):
            return (
                f"--config={value}: the config file {path} is missing (looked for from {os.getcwd()});"
                " give the path of an experiment file, e.g. experiments/toy2d.py"
            )
    return None


def run(main, names: tuple[str, ...] = ("config",)) -> None:
    """``absl.app.run(main)`` on this process's arguments, each repeated ``--<name>.<key>``
    override kept at its last place (:func:`last_override_wins`).

    A user error (a missing config file, a bad flag or config value, a file or setting the command
    refuses) is printed as its message on stderr and the process exits with status 1; a traceback
    only for bugs, or for every error with ``--debug`` or ``SHORTCUT_JAX_DEBUG=1``.
    """
    from absl import app, flags

    argv = [a for a in sys.argv if a not in ("--debug", "--nodebug")]
    debug = "--debug" in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = last_override_wins(argv, names)

    def parse(args):
        try:
            return flags.FLAGS(args)
        except (flags.Error, AttributeError, KeyError) as err:
            if debug:
                raise
            raise UserError(_flag_error_message(err, args, names)) from err

    def main_usage(args):
        quiet_logs()  # absl's handler is the root logger's now
        try:
            return main(args)
        except app.UsageError as err:
            raise UserError(str(err)) from err

    quiet_logs()
    try:
        if not debug:
            missing = "--config" in {a.split("=", 1)[0] for a in argv} and _missing_config_file(argv)
            if missing:
                raise UserError(missing)
        app.run(main_usage, argv=argv, flags_parser=parse)
    except Exception as err:  # noqa: BLE001 - printed, or raised again with its traceback
        message = None if debug else user_message(err)
        if message is None:
            raise
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_flags(flag_values, body, names: tuple[str, ...] = ("config",)) -> None:
    """:func:`run` for a command whose flags are already defined in ``flag_values`` and whose work
    is ``body(flag_values)``: positional arguments are refused."""
    from absl import app

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        body(flag_values)

    run(main, names=names)
