"""The README and docs/recipes.md: their snippets run, in order; the set-up commands are CI's."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.behaviour_doc import COMMAND, render
from tests.helpers import torchrun

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
RECIPES = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")  # the README continued


def _blocks(language: str, text: str = README) -> list[str]:
    """Return the fenced code blocks of ``language`` in ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def _section(title: str) -> str:
    """Return the README's section whose ``## `` heading starts with ``title``."""
    return README.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def _command(marker: str) -> str:
    """Return the bash block that follows ``<!-- marker -->``."""
    found = re.findall(rf"<!-- {marker} -->\n```bash\n(.*?)\n```", README, flags=re.S)
    assert len(found) == 1, f"expected one {marker} block, found {len(found)}"
    return found[0]


@pytest.mark.slow
def test_every_python_snippet_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All ```python blocks of the README, then of docs/recipes.md, run top to bottom in one
    namespace, as a reader pastes them."""
    pytest.importorskip("torchmetrics")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    blocks = [("README.md", b) for b in _blocks("python")]
    blocks += [("docs/recipes.md", b) for b in _blocks("python", RECIPES)]
    assert len(blocks) >= 5
    for number, (name, block) in enumerate(blocks, start=1):
        exec(compile(block, f"{name} python block {number}", "exec"), namespace)


REPORT = """
import os

import torch as _torch

_torch.save(
    {"rank": sampler.rank, "world": sampler.num_replicas, "shard": list(sampler),
     "weights": {k: v.cpu() for k, v in ddp.module.state_dict().items()}},
    f"rank{os.environ['RANK']}.pt",
)
"""


@pytest.mark.slow
def test_the_distributed_snippet_joins_torchruns_group_and_trains_one_shard_per_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun on 2 gloo ranks, the README's distributed snippet joins one group of 2
    (not a one-process group per rank): each rank trains on its own half of the data and the
    DDP replicas end identical."""
    data = _blocks("python")[0]  # the tour's made-up data and Net
    setup = _blocks("python")[1].split("\nbest = ", 1)[0]  # the tour's device, loss, metrics
    assert "metrics =" in setup and "device =" in setup
    (snippet,) = _blocks("python", _section("Going distributed"))
    script = tmp_path / "readme_distributed.py"
    script.write_text("\n".join([data, setup, snippet, REPORT]), encoding="utf-8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on the CPU, whatever the machine
    out = torchrun([str(script)], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert "rank 0 of 2" in out.stdout and "rank 1 of 2" in out.stdout, out.stdout  # may interleave
    first, second = (set(r["shard"]) for r in ranks)
    assert len(first) == len(second) == 192 and not first & second  # 384 samples, split
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name


def test_the_readme_stays_a_reference_of_at_most_25_000_bytes() -> None:
    """The README is a reference of at most 25,000 bytes; full tables and lists live in docs/."""
    assert len(README.encode("utf-8")) <= 25_000


def test_there_are_exactly_two_one_line_setup_commands() -> None:
    """The README has one command for the main job and one for the tests, one line each."""
    demo, tests = _command("demo-command"), _command("test-command")
    assert "\n" not in demo and "\n" not in tests
    assert "examples/digits.py" in demo and "pytest" in tests
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert setup.count("```bash") == 2


def test_the_setup_says_how_to_put_torchs_cpu_build_in_the_venv_first() -> None:
    """Before the set-up commands, the README gives the one line that puts torch's CPU build
    in .venv, so a CPU machine does not download 3 GB of CUDA wheels."""
    before = _section("Set up").split("<!-- demo-command -->", 1)[0]
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    cpu = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert f"`{venv}{cpu}`" in before, before


def test_creating_the_venv_again_keeps_what_it_holds(tmp_path: Path) -> None:
    """`python3 -m venv .venv` over an existing venv keeps its packages: a CPU torch put in
    first is still there when the set-up command runs."""
    venv = [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")]
    subprocess.run(venv, check=True)
    site = next((tmp_path / ".venv").glob("[Ll]ib/python*/site-packages"), None)
    site = site or tmp_path / ".venv" / "Lib" / "site-packages"  # Windows
    (site / "kept.pth").write_text("", encoding="utf-8")
    subprocess.run(venv, check=True)
    assert (site / "kept.pth").exists()


def test_the_readme_says_how_long_the_suite_takes_and_how_to_run_a_quick_subset() -> None:
    """After the test command, the README says how long the suite takes on 2 CPU cores and
    gives the `-m "not slow"` command of the quick subset, with its duration."""
    after = README.split("<!-- test-command -->", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"about \d+ minutes on 2 CPU cores", after), after
    assert re.search(r'`python -m pytest -m "not slow"`, about \d+ (seconds|minutes?)', after)


def _marked_slow(node: ast.FunctionDef) -> bool:
    """Whether a test function is decorated with ``@pytest.mark.slow``."""
    return any(ast.unparse(d) == "pytest.mark.slow" for d in node.decorator_list)


def test_the_quick_subset_keeps_tests_of_every_test_file() -> None:
    """`-m "not slow"` keeps tests of every tests/test_*.py, so it checks every module;
    test_benchmarks.py aside: each of its tests runs a benchmark script in a new process."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == "test_benchmarks.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_marks = [ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
                        and "pytestmark" in map(ast.unparse, n.targets)]  # fmt: skip
        assert not any("slow" in mark for mark in module_marks), f"{path.name}: all slow"
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        kept = [n.name for n in functions if n.name.startswith("test_") and not _marked_slow(n)]
        assert kept, f"{path.name}: every test is marked slow"


def test_every_example_is_linked_from_the_readme_or_the_recipes() -> None:
    """Each examples/*.py is linked from the README or docs/recipes.md, so users find it."""
    examples = {path.name for path in (ROOT / "examples").glob("*.py")}
    linked = set(re.findall(r"\]\(examples/([\w.]+\.py)\)", README))
    linked |= set(re.findall(r"\]\(\.\./examples/([\w.]+\.py)\)", RECIPES))
    assert examples <= linked, sorted(examples - linked)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run extracts and runs the README's test command, not a copy of it."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "test-command" in script and "README.md" in script
    extracted = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == _command("test-command")


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
def test_the_code_is_ruff_clean() -> None:
    """ruff check and ruff format --check pass on the whole repository."""
    for args in (["check", "."], ["format", "--check", "."]):
        command = [sys.executable, "-m", "ruff", *args]
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_test_the_readme_cites_exists() -> None:
    """Each `test_...` name the README or the recipes link a behaviour to is a test in tests/."""
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", README + RECIPES))
    defined: set[str] = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), flags=re.M))
    assert cited, "the README cites no test"
    assert cited <= defined, sorted(cited - defined)


def test_the_behaviour_doc_is_generated_from_the_current_tests() -> None:
    """docs/behaviour.md is exactly what the tests' docstrings generate now."""
    doc = ROOT / "docs" / "behaviour.md"
    current = doc.read_text(encoding="utf-8") if doc.exists() else ""
    assert current == render(), f"docs/behaviour.md is out of date; regenerate it: {COMMAND}"
