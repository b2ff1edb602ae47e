"""``spar --help`` and ``spar <command> --help`` start without the heavy libraries: the command registry and the
sub-packages' ``cli`` modules import only argument definitions (typed configs), never torch, Ray, MLflow, Zarr,
open_clip or webdataset; a command's work is imported when it runs."""

from __future__ import annotations

import argparse
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


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every command and sub-command below ``parser`` that has no sub-commands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


def test_every_command_parses_to_a_handler() -> None:
    """Each registered command and sub-command, with required arguments or without, names the function that runs
    it (read from its parser's defaults, so nothing has to be parsed)."""
    from pipeline.cli import build_parser, resolve_handler

    for command in COMMANDS:
        leaves = [(p, sub) for p, sub in _leaf_parsers(build_parser(command)) if p[:1] == (command,)]
        assert leaves, command
        for path, sub in leaves:
            args = argparse.Namespace(handler=sub.get_default("handler"), func=sub.get_default("func"))
            assert callable(resolve_handler(args)), " ".join(path)


BAD_CONFIGS = {
    "ingest": ["ingest", "SRC", "--out", "OUT", "--set", "shard_size=0"],
    "precompute": ["precompute", "--images", "I", "--set", "stride=-4"],
    "distill": ["distill", "--images", "I", "--cache", "C", "--set", "epochs=0"],
    "demo": ["demo", "--steps", "-3"],
}


@pytest.mark.parametrize("command", sorted(BAD_CONFIGS))
def test_a_bad_stage_config_is_refused_before_ray_and_the_stage_imports(command: str) -> None:
    """The console command's path (``main(argv, early_ray=True)``, as ``spar`` runs it) refuses a bad value with exit
    code 2 and one line, having imported no heavy library and started no Ray (a typo used to cost a Ray start and
    the stage's imports, 12-16 s on the 2-core machine)."""
    code = (
        "import contextlib, io, sys\n"
        "from pipeline.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    rc = main({BAD_CONFIGS[command]!r}, early_ray=True)\n"
        "print('RC', rc, err.getvalue().strip().count(chr(10)), err.getvalue().strip().split(':')[0])"
    )
    loaded = _modules_after(code)
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY), sorted(
        set(HEAVY) & {m.split(".")[0] for m in loaded}
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"RC 2 0 spar {command}" in out, out


@pytest.mark.parametrize("workers", [1, 2])
def test_the_early_start_warms_the_teacher_only_where_the_demo_computes_it_on_ray(
    workers: int, tmp_path
) -> None:
    """``spar demo``'s early Ray start imports the teacher's modules in Ray's idle workers only when the demo's own
    recipe will compute its caches in Ray tasks: one worker computes them in the command's process (warming Ray
    workers then only competes with the command's imports), two workers use Ray tasks."""
    from pipeline.cache.config import precomputes_in_process
    from pipeline.cli import _local_ray_use
    from pipeline.workflow.config import DemoConfig
    from pipeline.workflow.demo import demo_recipe

    cfg = DemoConfig(workdir=str(tmp_path), workers=workers)
    recipe, _ = demo_recipe(cfg, tmp_path)
    starts, warms_teacher = _local_ray_use(argparse.Namespace(command="demo"), cfg)
    assert precomputes_in_process(recipe.precompute) == (workers == 1)
    assert starts and warms_teacher == (workers == 2)
