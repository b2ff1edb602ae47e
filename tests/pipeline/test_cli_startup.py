"""``spar --help`` and ``spar <command> --help`` start without the heavy libraries: the command registry and the
sub-packages' ``cli`` modules import only argument definitions (typed configs), never torch, Ray, MLflow, Zarr,
open_clip or webdataset; a command's work is imported when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS

HEAVY = (
    "torch",
    "ray",
    "mlflow",
    "zarr",
    "open_clip",
    "webdataset",
    "pyarrow",
    "matplotlib",
    "skimage",
    "s3fs",
)


def _modules_after(code: str) -> set[str]:
    out = (
        subprocess.run(
            [sys.executable, "-c", f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return set(json.loads(out))


def _heavy(mods: set[str]) -> list[str]:
    return sorted(h for h in HEAVY if h in mods)


def test_top_level_help_imports_no_stage() -> None:
    mods = _modules_after(
        "import contextlib, io\nfrom pipeline.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])"
    )
    assert _heavy(mods) == []
    assert not any(m.startswith(("pipeline.data.", "pipeline.train.", "pipeline.eval.")) for m in mods)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_imports_no_heavy_library(command: str) -> None:
    mods = _modules_after(
        "import contextlib, io\nfrom pipeline.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main([{command!r}, '--help'])"
    )
    assert _heavy(mods) == [], f"spar {command} --help imports {_heavy(mods)}"


def test_every_command_parses_to_a_handler() -> None:
    """Each registered command's parser names the function that runs it."""
    from pipeline.cli import build_parser, resolve_handler

    argv = {"bench": ["bench", "core"], "cache": ["cache", "ls"]}
    for command in COMMANDS:
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command")
        assert command in sub.choices
        try:
            args = parser.parse_args(argv.get(command, [command]))
        except SystemExit:  # required positional arguments: registration is what is checked here
            continue
        assert callable(resolve_handler(args)), command
