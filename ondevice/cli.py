"""The ``ondevice`` command: look at, export, import and wipe a profile from a shell.

::

    ondevice report  PROFILE_DIR [--user ID] [--format json|text]
    ondevice export  PROFILE_DIR [--user ID] [--out FILE]
                     (--export-passphrase-env VAR | --plaintext)
    ondevice import  PROFILE_DIR FILE [--export-passphrase-env VAR]
    ondevice wipe    PROFILE_DIR [--user ID] [--yes]
    ondevice verify  PROFILE_DIR

The profile's key comes from the OS keychain (the default), from a passphrase in an
environment variable the user names (``--passphrase-env VAR``) or from a 64-hex-digit raw
key in one (``--raw-key-env VAR``). Secrets are never accepted on the command line, where
other users of the machine could read them in the process list.

Output is JSON where it is data (``json.dumps(..., indent=2, sort_keys=True)``) and text
where it is a report meant for a person. Library errors become one line on stderr,
``ondevice: error: <message>``, and exit code 1; usage errors exit with 2, as argparse
does. No traceback reaches the user for an error the library raises on purpose.

Adding a command: write ``configure(parser)`` and ``run(args) -> int`` functions and
:func:`register` a :class:`Command` (see the four built-in commands at the end of this
module). A command that works on a profile sets ``profile=True`` and gets the shared
``PROFILE_DIR`` argument and key options; it opens the profile with :func:`open_engine`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from . import __version__
from .engine import DB_FILE, PersonalizationEngine, ProfileReport
from .errors import OndeviceError, ProfileNotFoundError
from .export import MAX_EXPORT_BYTES
from .keys import Keychain, KeyProvider, Passphrase, RawKey, profile_key_provider

__all__ = [
    "CliError",
    "Command",
    "UsageError",
    "build_parser",
    "format_report",
    "key_provider",
    "main",
    "open_engine",
    "print_json",
    "register",
]

PROG: Final = "ondevice"
#: Exit codes: success, a failure (library or environment), a usage error.
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2


class CliError(Exception):
    """A failure reported as ``ondevice: error: <message>`` with exit code 1."""

    exit_code: int = EXIT_FAILURE


class UsageError(CliError):
    """A wrong combination of options; exit code 2, like argparse's own errors."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand of ``ondevice``.

    ``configure`` adds the command's own arguments to its subparser; ``run`` does the
    work and returns the exit code. With ``profile=True`` the subparser also gets the
    ``PROFILE_DIR`` positional argument and the shared key options first.
    """

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    profile: bool = True
    epilog: str | None = None


_COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand (later commands such as ``demo`` or ``sync`` register here).
    A second command with the same name is refused."""
    if command.name in _COMMANDS:
        raise ValueError(f"the command {command.name!r} is already registered")
    _COMMANDS[command.name] = command
    return command


# -- the parser -------------------------------------------------------------------------

_KEY_HELP: Final = """\
the profile key: by default the OS keychain; or --passphrase-env VAR (the passphrase is
read from the environment variable VAR); or --raw-key-env VAR (a 64-hex-digit raw key in
VAR). Secrets are never accepted on the command line."""


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile_dir", metavar="PROFILE_DIR", help="the profile directory")
    group = parser.add_argument_group("key options", _KEY_HELP)
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="read the profile passphrase from the environment variable VAR",
    )
    exclusive.add_argument(
        "--raw-key-env",
        metavar="VAR",
        help="read the raw 256-bit profile key (64 hex digits) from the environment variable VAR",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``ondevice`` argument parser, with one subparser per registered command."""
    # No abbreviations: "--passphrase SECRET" must not be taken for "--passphrase-env".
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description=(
            "Inspect, export, import and wipe an encrypted ondevice profile; get "
            "recommendations from it; or run the demo. "
            "Run 'ondevice COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS.values():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=textwrap.fill(command.description, width=88),
            epilog=command.epilog,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command.profile:
            _add_profile_arguments(p)
        command.configure(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ondevice`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's usage errors
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        return run(args)
    except CliError as exc:  # UsageError included (exit code 2)
        _error(str(exc))
        return exc.exit_code
    except OndeviceError as exc:
        _error(str(exc) or type(exc).__name__)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (``ondevice export ... | head``): not an error worth a
        # message; stop Python from complaining again when it flushes stdout at exit.
        _silence_stdout()
        return EXIT_FAILURE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (tests capture it): nothing to silence


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- shared helpers for commands --------------------------------------------------------


def _env(var: str, option: str) -> str:
    value = os.environ.get(var)
    if value is None:
        raise CliError(f"the environment variable {var} (named by {option}) is not set")
    if not value:
        raise CliError(f"the environment variable {var} (named by {option}) is empty")
    return value


def key_provider(args: argparse.Namespace) -> KeyProvider:
    """The key provider the shared key options ask for (the OS keychain by default)."""
    if args.passphrase_env is not None:
        return Passphrase(_env(args.passphrase_env, "--passphrase-env"))
    if args.raw_key_env is not None:
        text = _env(args.raw_key_env, "--raw-key-env").strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise CliError(
                f"the environment variable {args.raw_key_env} (named by --raw-key-env) must "
                "hold a 256-bit key as 64 hex digits"
            )
        return RawKey(raw)
    _hint_key_option(Path(args.profile_dir).expanduser())
    return Keychain()


def _hint_key_option(directory: Path) -> None:
    """No key option was given: if the key file says the profile is not protected by the
    keychain, say which option is missing instead of trying the keychain."""
    try:
        kind = profile_key_provider(directory)
    except OndeviceError:
        return  # no readable key file: let the engine report what is wrong
    if kind == "passphrase":
        raise CliError(
            "this profile is protected by a passphrase: put it in an environment variable "
            "and name it with --passphrase-env VAR"
        )
    if kind == "raw":
        raise CliError(
            "this profile is protected by a raw key: put its 64 hex digits in an environment "
            "variable and name it with --raw-key-env VAR"
        )


def open_engine(args: argparse.Namespace, **options: Any) -> PersonalizationEngine:
    """Open the existing profile named by ``PROFILE_DIR`` with the key options, keeping
    its stored privacy level and policy (a missing profile is ProfileNotFoundError).
    ``options`` go to the engine (a bundle, for example)."""
    directory = Path(args.profile_dir).expanduser()
    if not (directory / DB_FILE).exists():
        # Checked before the key, so a mistyped path does not ask for a passphrase.
        raise ProfileNotFoundError(f"no ondevice profile in {directory}")
    return PersonalizationEngine(
        directory,
        key=key_provider(args),
        privacy_level=None,
        policy=None,
        create=False,
        **options,
    )


def print_json(data: Any, out: TextIO | None = None) -> None:
    """Write ``data`` as indented, key-sorted JSON and a newline."""
    stream = out if out is not None else sys.stdout
    stream.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _require_user(engine: PersonalizationEngine, user_id: str | None) -> None:
    if user_id is not None and user_id not in engine.users():
        raise CliError(f"there is no user {user_id!r} in this profile")


def _add_user_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--user", metavar="ID", help=f"{what} only this user (default: everyone)")


# -- report -----------------------------------------------------------------------------


def _configure_report(parser: argparse.ArgumentParser) -> None:
    _add_user_option(parser, "report on")
    parser.add_argument(
        "--format",
        choices=("json", "text"),
        default="json",
        help="json (the default, for programs) or text (a report for people)",
    )


def _run_report(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        _require_user(engine, args.user)
        report = engine.report(args.user)
    if args.format == "json":
        print_json(report.to_dict())
    else:
        sys.stdout.write(format_report(report, Path(args.profile_dir)))
    return EXIT_OK


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _days(days: float | None) -> str:
    if days is None:
        return "until you remove it"
    return f"{days:g} day" + ("" if days == 1 else "s")


def format_report(report: ProfileReport, directory: Path) -> str:
    """The human-readable form of a :class:`~ondevice.ProfileReport`."""
    data = report.to_dict()
    lines = [
        f"Profile {directory}",
        f"  privacy level: {data['privacy_level']}",
        f"  rolling window: last {data['window']} interactions per user",
        f"  retention: {_days(data['retention_days'])}",
        f"  encryption: {data['encryption']}",
        "",
        "What may be stored, and why ([x] collected at this privacy level):",
    ]
    for f in data["fields"]:
        mark = "x" if f["collected"] else " "
        lines.append(
            f"  [{mark}] {f['name']}  (kept {_days(f['retention_days'])}; "
            f"from level {f['collected_from_level']})"
        )
        lines.append(f"        {f['purpose']}")
    users = data["users"]
    lines += ["", f"Users ({len(users)}):"]
    if not users:
        lines.append("  (none)")
    for u in users:
        lines.append(f"  {u['user_id']}  (since {_when(u['created_at'])})")
        lines.append(
            f"    interactions: {u['interactions']}"
            + (
                f" ({_when(u['oldest_interaction'])} to {_when(u['newest_interaction'])})"
                if u["interactions"]
                else ""
            )
        )
        signals = ", ".join(f"{k}={v!r}" for k, v in sorted(u["signals"].items()))
        lines.append(f"    signals: {signals or '-'}")
        lines.append(f"    context values: {u['context_values']}")
        lines.append(f"    active days: {u['active_days']}")
        lines.append(f"    derived state: {', '.join(u['derived']) or '-'}")
        lines.append(f"    blocked items: {u['blocked_items']}")
    return "\n".join(lines) + "\n"


# -- export -----------------------------------------------------------------------------


def _configure_export(parser: argparse.ArgumentParser) -> None:
    _add_user_option(parser, "export")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="write the export to FILE (replaced if it exists, readable by you only)",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--export-passphrase-env",
        metavar="VAR",
        help="encrypt the export with the passphrase in the environment variable VAR",
    )
    how.add_argument(
        "--plaintext",
        action="store_true",
        help="write a readable, unencrypted export (to FILE, or to stdout without --out)",
    )


def _run_export(args: argparse.Namespace) -> int:
    if args.export_passphrase_env is None and not args.plaintext:
        raise UsageError(
            "choose how to protect the export: --export-passphrase-env VAR to encrypt it, "
            "or --plaintext for a readable export (to --out FILE, or to stdout)"
        )
    if args.out is None and not args.plaintext:
        raise UsageError(
            "an encrypted export needs --out FILE (only a --plaintext export goes to stdout)"
        )
    passphrase = (
        _env(args.export_passphrase_env, "--export-passphrase-env")
        if args.export_passphrase_env is not None
        else None
    )
    with open_engine(args) as engine:
        _require_user(engine, args.user)
        if args.out is None:
            print_json(engine.export_profile(args.user))
            return EXIT_OK
        target = engine.export_profile_to(
            args.out,
            user_id=args.user,
            passphrase=passphrase,
            allow_plaintext=args.plaintext,
        )
        users = [args.user] if args.user is not None else engine.users()
    print_json({"path": str(target), "encrypted": passphrase is not None, "users": users})
    return EXIT_OK


# -- import -----------------------------------------------------------------------------


def _configure_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the export file ('-' reads stdin)")
    parser.add_argument(
        "--export-passphrase-env",
        metavar="VAR",
        help="decrypt the export with the passphrase in the environment variable VAR",
    )


def _run_import(args: argparse.Namespace) -> int:
    passphrase = (
        _env(args.export_passphrase_env, "--export-passphrase-env")
        if args.export_passphrase_env is not None
        else None
    )
    source: bytes | str
    if args.file == "-":
        # Bounded: a stream larger than the limit is refused without being read whole.
        source = sys.stdin.buffer.read(MAX_EXPORT_BYTES + 1)
        if len(source) > MAX_EXPORT_BYTES:
            raise CliError(f"export too large (over {MAX_EXPORT_BYTES} bytes): nothing imported")
    else:
        source = str(args.file)
        if not Path(source).expanduser().is_file():
            raise CliError(f"no export file at {source}")
    with open_engine(args) as engine:
        imported = engine.import_profile(source, passphrase=passphrase)
    print_json(imported)
    return EXIT_OK


# -- wipe -------------------------------------------------------------------------------


def _configure_wipe(parser: argparse.ArgumentParser) -> None:
    _add_user_option(parser, "wipe")
    parser.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)"
    )


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question}\nType 'yes' to continue: ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() == "yes"


def _run_wipe(args: argparse.Namespace) -> int:
    if not args.yes and not _stdin_is_tty():
        raise UsageError(
            "refusing to wipe without confirmation: stdin is not a terminal; pass --yes to "
            "wipe anyway (nothing was deleted)"
        )
    engine = open_engine(args)
    try:
        _require_user(engine, args.user)
        if args.user is not None:
            what = f"everything stored about user {args.user!r} in {engine.path}"
        else:
            what = (
                f"the whole profile in {engine.path} ({len(engine.users())} users): "
                "its key is destroyed and its files deleted"
            )
        if not args.yes and not _confirm(f"This permanently deletes {what}."):
            raise CliError("aborted: nothing was deleted")
        if args.user is not None:
            engine.wipe_profile(args.user)
            print(f"wiped user {args.user!r}")
        else:
            engine.wipe()
            print(f"wiped the profile in {engine.path}")
    finally:
        engine.close()
    return EXIT_OK


# -- the built-in commands ---------------------------------------------------------------

register(
    Command(
        name="report",
        help="what the profile stores, and why",
        description=(
            "Show what the profile stores and why: every field with its purpose, retention "
            "and whether the current privacy level collects it, and per user what is held."
        ),
        configure=_configure_report,
        run=_run_report,
    )
)
register(
    Command(
        name="export",
        help="write everything stored (encrypted unless --plaintext)",
        description=(
            "Export everything stored about one user (--user) or everyone, with each "
            "field's purpose. The file is encrypted with a passphrase from an environment "
            "variable; a readable export needs --plaintext."
        ),
        configure=_configure_export,
        run=_run_export,
        epilog=(
            "examples:\n"
            "  read -rs EXPORT_PASS && export EXPORT_PASS   # type it; not echoed, not in history\n"
            "  ondevice export DIR --out me.export --export-passphrase-env EXPORT_PASS\n"
            "  ondevice export DIR --plaintext > me.json"
        ),
    )
)
register(
    Command(
        name="import",
        help="restore users from an export",
        description=(
            "Restore the users of an export file into an existing profile (each imported "
            "user replaces that user's profile). Prints the imported user ids as JSON."
        ),
        configure=_configure_import,
        run=_run_import,
    )
)
register(
    Command(
        name="wipe",
        help="forget one user, or crypto-shred the whole profile",
        description=(
            "Without --user: crypto-shred the profile (destroy its key, delete the database "
            "and its WAL/SHM files). With --user: delete everything stored about that user. "
            "Asks for confirmation unless --yes."
        ),
        configure=_configure_wipe,
        run=_run_wipe,
        epilog=(
            "A backup of the key file plus its passphrase can still open a backup of the\n"
            "database: no software can destroy copies it cannot see."
        ),
    )
)


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    return


def _run_verify(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        pages = engine.verify()
    print(f"verified {pages} pages of {engine.path}: every page authenticates")
    return EXIT_OK


register(
    Command(
        name="verify",
        help="check every page of the profile (tampering, damage)",
        description=(
            "Check the authentication code of every page of the encrypted database and its "
            "structure. Ordinary use checks only the pages it reads; this reads them all. "
            "Exit code 1 with the usual 'cannot be read' error if any page fails. Writes "
            "nothing."
        ),
        configure=_configure_verify,
        run=_run_verify,
    )
)


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to create the demo profile (default: a temporary directory)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(sys.stdout, directory=args.dir)


register(
    Command(
        name="demo",
        help="a tour on built-in sample data: levels, sync, export, wipe (offline)",
        description=(
            "Create an encrypted profile with a key generated for the run, record a "
            "scripted session, show what is stored and why, write an encrypted export, "
            "crypto-shred the profile and show that the wipe holds. Needs no network."
        ),
        configure=_configure_demo,
        run=_run_demo,
        profile=False,
    )
)


def _configure_recommend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="the local user to recommend for")
    parser.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a declared context field, e.g. --context daypart=morning (repeatable)",
    )
    parser.add_argument("--current-item", help="the item the user is looking at now")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--bundle", type=Path, help="a signed catalog bundle (needs --bundle-public-key)"
    )
    group.add_argument(
        "--sample", action="store_true", help="use the sample catalog shipped with ondevice"
    )
    parser.add_argument(
        "--bundle-public-key",
        metavar="HEX",
        help="the operator's Ed25519 public key the bundle must be signed with (64 hex digits)",
    )


def _run_recommend(args: argparse.Namespace) -> int:
    from .sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY

    if args.sample:
        bundle, public_key = SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY
    else:
        if not args.bundle_public_key:
            raise UsageError("--bundle needs --bundle-public-key HEX (the pinned signing key)")
        try:
            public_key = bytes.fromhex(args.bundle_public_key)
        except ValueError:
            raise UsageError("--bundle-public-key must be 64 hex digits") from None
        bundle = args.bundle
    context: dict[str, str] = {}
    for pair in args.context:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--context takes FIELD=VALUE, got {pair!r}")
        context[name] = value
    with open_engine(args, bundle=bundle, bundle_public_key=public_key) as engine:
        recs = engine.get_recommendations(
            args.user, context or None, args.k, current_item=args.current_item
        )
    print_json(recs.to_dict())
    return EXIT_OK


register(
    Command(
        name="recommend",
        help="recommendations for a user, with the why (JSON)",
        description=(
            "Rank items for a user from the profile and a signed catalog bundle, on this "
            "machine, with the level that answered and an explanation per item. Context "
            "values are passed as text and must be declared in the profile's policy."
        ),
        configure=_configure_recommend,
        run=_run_recommend,
    )
)


def reference_markdown() -> str:
    """The CLI reference (docs/cli.md): every command's ``--help``, at 100 columns."""
    import contextlib
    import io
    import os

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        parts = [
            "# The `ondevice` command\n",
            "Generated from `--help` by `ondevice.cli.reference_markdown()`; a test keeps it "
            "in step.\n",
        ]
        sections = [("ondevice", parser)]
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sections += [(f"ondevice {name}", p) for name, p in sub.choices.items()]
        for title, p in sections:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                p.print_help()
            parts.append(f"## `{title}`\n\n```\n{buffer.getvalue().rstrip()}\n```\n")
        return "\n".join(parts)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
