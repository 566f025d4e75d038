"""README.md's layout section lists every file of the package (usp_scale/ and the kernels' folder kernels/, installed
as usp_scale.kernels) once, one line each, and nothing else."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    start = text.index("## Layout")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_package_file_has_one_line_in_the_readme_layout():
    listed = re.findall(r"^((?:usp_scale|kernels)/\S+\.py)\s+\S", _section(), flags=re.M)
    on_disk = sorted(os.path.relpath(os.path.join(root, f), REPO)
                     for top in ("usp_scale", "kernels")
                     for root, _, files in os.walk(os.path.join(REPO, top))
                     for f in files if f.endswith(".py"))
    dupes = sorted({p for p in listed if listed.count(p) > 1})
    assert not dupes, f"listed more than once in README.md's layout: {dupes}"
    missing = sorted(set(on_disk) - set(listed))
    assert not missing, f"files not in README.md's layout section (add one line each): {missing}"
    gone = sorted(set(listed) - set(on_disk))
    assert not gone, f"README.md's layout lists files that do not exist: {gone}"
    # every line of the file list names a file and says what it holds
    block = re.search(r"```\n(.*?)```", _section(), flags=re.S).group(1)
    bad = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")
           and not re.match(r"(usp_scale|kernels)/\S+\.py {2,}\S", ln)]
    assert not bad, f"layout lines that are not 'path  description': {bad}"
