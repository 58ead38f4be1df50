"""The README's Python examples run as written, and its two commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    api = next(b for b in _blocks("python") if "sharify.plan(model)" in b)
    exec(compile(api, "README.md", "exec"), namespace)
    persistence = next(b for b in _blocks("python") if "sharify.save(" in b)
    exec(compile(persistence, "README.md", "exec"), namespace)  # continues with the API example's model
    assert namespace["problems"] == [] and (tmp_path / "r34_shared.safetensors").exists()


def test_readme_commands_are_the_ci_commands() -> None:
    commands = [b.strip() for b in _blocks("bash")]
    assert "python -m pip install -e . && sharify report resnet50" in commands
    test_command = 'python -m pip install -e ".[test]" && python -m pytest'
    assert test_command in commands
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci


def test_cli_report_resnet50_text_and_json() -> None:
    import json

    from sharify.cli import main

    out = subprocess.run([sys.executable, "-m", "sharify", "report", "resnet50", "--json"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    data = json.loads(out)
    assert data["params_before"] == 25_557_032 and data["params_after"] == 20_469_800
    assert 0.19 < data["reduction"] < 0.2 and len(data["groups"]) == 4
    assert main(["report", "tv:resnet18", "--markdown"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "resnet5O"], "unknown model 'resnet5O'.*did you mean"),
        (["report", "vgg11"], "no residual blocks found in VGG"),
        (["report", "resnet18", "--preset", "dsfb-basis"], "method='basis' needs shared_rank"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code(argv: list[str], message: str, capsys) -> None:
    from sharify.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and err.count("\n") == 0 and "Traceback" not in err
