"""The README's Python blocks run as printed (in order, as one session, on the smaller built-in
base the README names), and its links stay inside the repository."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def readme_base_spec(text: str) -> str:
    """The ``SPARSE_ENGINE_BASE_SPEC`` value the README says its blocks run with."""
    found = re.findall(r"SPARSE_ENGINE_BASE_SPEC='(\{.*?\})'", text, flags=re.S)
    assert found, "README no longer names the SPARSE_ENGINE_BASE_SPEC its Python blocks run with"
    return json.dumps(json.loads(re.sub(r"\s+", " ", found[0])))


def test_every_python_block_runs_as_printed(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) >= 4
    monkeypatch.setenv("SPARSE_ENGINE_BASE_SPEC", readme_base_spec(text))
    monkeypatch.setenv("SPARSE_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        line = text[: text.index(block)].count("\n") + 1
        exec(compile(block, f"README.md, block {i + 1} (line {line})", "exec"), namespace)  # noqa: S102
    # the quickstart printed the base's and the expert's scores, and its expert trained
    printed = capsys.readouterr().out
    assert re.search(r"^base\s+\{'colour_to_fruit': [0-9.]+\}$", printed, flags=re.M), printed
    assert re.search(r"^expert\s+\{'colour_to_fruit': [0-9.]+\}$", printed, flags=re.M), printed
    losses = namespace["result"].losses
    assert sum(losses[-10:]) < sum(losses[:10]), "the quickstart's expert did not learn"


def test_links_stay_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT), f"README links {target}, outside the repository"
        assert path.exists(), f"README links {target}, which does not exist"
    assert "../" not in re.sub(r"```.*?```", "", text, flags=re.S), "README points above the repository"
