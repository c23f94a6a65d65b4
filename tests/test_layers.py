"""The package's import layers (pyproject's import-linter contracts) and the registries' public face."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patchgpt.cli import main
from patchgpt.data import DATASETS
from patchgpt.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent


def test_import_layers_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and "0 broken" in r.stdout


def test_help_lists_every_task_and_data_spec(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name, src in DATASETS.items():
        assert src.usage(name) in text
    for cls in TASKS.values():
        if cls.section:
            assert cls.section in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in TASKS)


def test_generic_modules_name_no_task():
    """train, cli, config, checkpoint, report and the generic data modules know tasks only through TASKS."""
    names = [*TASKS, *(cls.__name__ for cls in TASKS.values())]
    generic = ["train.py", "cli.py", "config.py", "checkpoint.py", "report.py", "evaluate.py",
               "data/base.py", "data/specs.py", "data/shards.py", "data/members.py"]
    for rel in generic:
        text = (ROOT / "patchgpt" / rel).read_text()
        # "vq" is also a tokenizer kind (tokenizer.kind=vq), which generic code may name, and "vqa" also a data
        # spec (vqa:QUESTIONS.json:...), which the DATASETS registry names: its `"NAME": Source(` lines
        code = "\n".join(line.split("#")[0] for line in text.splitlines()
                         if "kind" not in line and not re.match(r'\s*"[\w-]+": Source\(', line))
        for name in names:
            for quoted in (f'"{name}"', f"'{name}'", f"import {name}", f"{name}("):
                assert quoted not in code, f"{rel} names {name!r}"
