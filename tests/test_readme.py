"""The README cannot drift from the CLI: every command in its code blocks parses under the real command line
(no unknown option, no value of the wrong type, no missing argument), and the ones that are quick run for real
and exit 0. Training-sized commands are parsed, not run; the suite trains elsewhere."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MAKEFILE = README.with_name("Makefile")
# quick enough to run as written (a plan, a listing, a sweep's table and ETA): each well under a few seconds
RUN = re.compile(r"^(plan( |$)|laws( |$)|hw list( |$))")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def runnable(argv: list[str]) -> bool:
    """A plan or a listing that reads no file and redirects nothing."""
    return bool(RUN.match(" ".join(argv))) and not any("/" in a or a.endswith(".json") or a in (">", "|", "<")
                                                       for a in argv)


def readme_commands() -> list[list[str]]:
    """The argv of every flopwise command in README.md's code blocks (torchrun's '-m flopwise' ones too)."""
    out = []
    for block in FENCE.findall(README.read_text()):
        for line in block.splitlines():
            if not line.lstrip().startswith(("flopwise ", "torchrun ")):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # an unbalanced quote: fail as a command that does not parse, naming the line
                out.append(["<unparsable README line>", line.strip()])
                continue
            if words[:1] == ["flopwise"]:
                out.append(words[1:])
            elif "flopwise" in words:
                out.append(words[words.index("flopwise") + 1:])
    return out


def make_targets() -> list[str]:
    targets = []
    for block in FENCE.findall(README.read_text()):
        targets += [line.split()[1] for line in block.splitlines() if line.startswith("make ")]
    return targets


def parse(argv: list[str]):
    """Parse ``argv`` as `flopwise` would, down to the command it names, without running it."""
    from typer.main import get_command

    from flopwise.cli import app

    cmd = get_command(app)
    ctx = cmd.make_context("flopwise", list(argv))
    while hasattr(cmd, "resolve_command"):  # a group: 'sweep run ...', 'hw list'
        name, cmd, rest = cmd.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 40 and {"plan", "train", "autopilot", "fit", "export"} <= {c[0] for c in COMMANDS}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(argv):
    ctx = parse(argv)
    assert ctx.command.name == (argv[1] if argv[0] in ("sweep", "hw") else argv[0])


@pytest.mark.parametrize("argv", [c for c in COMMANDS if runnable(c)],
                         ids=[" ".join(c)[:60] for c in COMMANDS if runnable(c)])
def test_quick_readme_command_runs(argv):
    from flopwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, err.getvalue()
    assert out.getvalue().strip()


def test_readme_make_targets_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE.read_text(), re.M))
    assert set(make_targets()) <= targets, set(make_targets()) - targets


def test_a_drifted_command_is_caught():
    """The check itself fails where it should: an option that does not exist, and a value of the wrong type."""
    from typer._click.exceptions import UsageError

    for argv in (["sweep", "run", "--resume", "--out", "sw"], ["plan", "--flops", "lots"], ["fit"]):
        with pytest.raises(UsageError):
            parse(argv)


SWEEPS = [c for c in COMMANDS if c[:2] == ["sweep", "run"]]


@pytest.mark.parametrize("argv", SWEEPS, ids=[" ".join(c)[:60] for c in SWEEPS])
def test_readme_sweep_dry_runs(argv, bundled, tmp_path, monkeypatch):
    """Each README sweep, with --dry-run: its table and ETA on the bundled corpus, nothing written."""
    from flopwise.cli import main

    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main([*argv, "--dry-run"])
    assert e.value.code == 0 and "ETA" in out.getvalue() and not any(tmp_path.iterdir())


def test_every_option_is_in_the_readme():
    """A new option cannot land undocumented: each command's options appear in README.md."""
    from typer.main import get_command

    from flopwise.cli import app

    readme = README.read_text()

    def leaves(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from leaves(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    missing = [f"{name} {opt}" for name, cmd in leaves(get_command(app), []) for p in cmd.params for opt in p.opts
               if opt.startswith("--") and opt != "--help" and not re.search(re.escape(opt) + r"(?![\w-])", readme)]
    assert not missing, missing


def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "From Python" block, run as written in an empty folder."""
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (From Python)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"a = 0\.4\d\d \(Chinchilla: 0.45\), verdict: ", out)  # the fit recovers the law's a
    assert (tmp_path / "my-fit" / "law.json").exists() and (tmp_path / "my-run" / "final.json").exists()
    assert re.search(r"val loss \d\.\d{3} nats/token after 20\d,\d{3} tokens", out)
