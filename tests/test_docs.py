"""The documentation is checked like code: README.md and every page of docs/.

- Every ```bash block runs, offline, in a temporary folder per page (the page's blocks in order,
  so a later block may read an earlier one's results) with a temporary ``PETLBENCH_CACHE``. A
  block whose first line is a marker is not run but checked: ``# needs real data`` and
  ``# needs a GPU`` (every ``petlbench`` subcommand and option must exist, by click's own parser,
  and the scripts and files it names must exist), ``# installs packages`` (the same, plus what its
  ``pip install`` lines name: files, folders, extras, the pinned torch versions).
- Every page is in mkdocs.yml's nav; every relative link and ``#anchor`` resolves (the checks
  ``mkdocs build --strict`` makes in CI, without needing mkdocs here).
- The plugin guide quotes the example plugins verbatim; the README's method tables agree with the
  methods' declarations and with the generated method x backbone matrix.

Why run the blocks: a command that a reader copies must work, and the docs must change when the
CLI does. The blocks are written to be quick (one demo task, two epochs); the pages run two at a
time, so the whole file takes about a minute on two cores.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

import petlbench

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FILES = [ROOT / "README.md", *PAGES]
MARKERS = ("# needs real data", "# needs a GPU", "# installs packages")
#: What a page's temporary folder holds, so that repository-relative commands (``python
#: benchmarks/...``, ``python -m tests.backbone_matrix``) work: read-only material is linked,
#: what a command may write (``docs/``, ``tests/``) is copied, so no block can change the clone.
LINKED = ("benchmarks", "scripts", "examples", "suites", "constraints.txt", "pyproject.toml")
COPIED = ("docs", "tests", "README.md")
BLOCK_TIMEOUT_S = 300


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ------------------------------------------------------------------ Markdown: blocks, links, headings
@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"

    @property
    def marker(self) -> str | None:
        first = self.text.lstrip("\n").split("\n", 1)[0].strip()
        return next((m for m in MARKERS if first.startswith(m)), None)


_FENCE = re.compile(r"^\s*(`{3,})(.*)$")


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (indented fences in lists included)."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        ticks, lang, start, body = opened.group(1), opened.group(2).strip(), i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{ticks}`*\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{rel(path)}:{start + 1}: code block never closed"
        indent = len(lines[start]) - len(lines[start].lstrip())
        out.append(Block(path, start + 1, lang, "\n".join(b[indent:] if b[:indent].isspace() else b for b in body)))
        i += 1
    return out


def prose(path: Path) -> str:
    """The file without its fenced code blocks and inline code (where links and headings are)."""
    text, out, fence = path.read_text(encoding="utf-8"), [], None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and re.match(rf"^\s*{fence}`*\s*$", line):
            fence = None
        elif fence is None:
            out.append(line)
        else:
            out.append("")
    return "\n".join(out)


def slugify(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading (the ids mkdocs gives headings)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = slugify(heading.group(1))
            out.add(slug if slug not in seen else f"{slug}_{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every inline Markdown link outside code."""
    for number, line in enumerate(prose(path).splitlines(), 1):
        line = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            yield number, target


# ------------------------------------------------------------------ shell commands of a block
def simple_commands(text: str) -> Iterator[list[str]]:
    """The simple commands of a bash block, as argument lists: continuation lines joined, here
    documents skipped, comments dropped, split at ``&&``, ``||``, ``;`` and ``|``."""
    lines = text.replace("\\\n", " ").splitlines()
    heredoc: str | None = None
    for line in lines:
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        found = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if found:
            heredoc = found.group(1)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.commentchars = "#"
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if set(token) <= set(";&|"):
                if current:
                    yield current
                current = []
            else:
                current.append(token)
        if current:
            yield current


def check_petlbench(args: list[str], where: str) -> None:
    """``petlbench ARGS`` parses: the subcommands exist, every option exists and takes its values."""
    from petlbench.cli import main

    cmd: click.Command = main
    ctx = click.Context(main, info_name="petlbench")
    args = list(args)
    while isinstance(cmd, click.Group):
        assert args, f"{where}: `petlbench` without a subcommand"
        name = args.pop(0)
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"{where}: `petlbench {name}` is not a command ({', '.join(cmd.list_commands(ctx))})"
        cmd, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    try:
        cmd.make_context(cmd.name, args, parent=ctx.parent)
    except click.ClickException as exc:
        pytest.fail(f"{where}: `petlbench {cmd.name} {shlex.join(args)}`: {exc.format_message()}")


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def optional_dependencies() -> set[str]:
    """The extras pyproject.toml declares (read by hand: tomllib needs Python 3.11, petlbench 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, flags=re.M))


def check_pip_install(args: list[str], where: str) -> None:
    """What a ``pip install`` line names exists: constraint files, local folders, extras; a pinned
    package is asked for at its pinned version."""
    extras = optional_dependencies()
    pins = pinned()
    it = iter(args)
    for arg in it:
        if arg in ("-c", "--constraint", "-r", "--requirement"):
            target = next(it)
            assert (ROOT / target).is_file(), f"{where}: pip {arg} {target}: no such file in the repository"
        elif arg in ("--index-url", "-i", "--extra-index-url"):
            next(it)
        elif arg.startswith("-"):
            continue
        elif arg.startswith((".", "/")):
            local, _, wanted = arg.partition("[")
            assert (ROOT / local).exists(), f"{where}: pip install {arg}: {local} is not in the repository"
            if wanted:
                unknown = {e.strip() for e in wanted.rstrip("]").split(",")} - extras
                assert not unknown, f"{where}: pip install {arg}: no extra {sorted(unknown)} in pyproject.toml"
        elif "==" in arg:  # a requirement at an exact version: a pinned package at its pin
            name, version = arg.split("==", 1)
            if name.strip().lower() in pins:
                assert version.strip() == pins[name.strip().lower()], \
                    f"{where}: {arg}, but constraints.txt pins {pins[name.strip().lower()]}"


def check_statically(block: Block) -> None:
    """A block that is not run: every command in it must at least be one that exists."""
    for args in simple_commands(block.text):
        while args and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", args[0]):  # VAR=value prefixes
            args = args[1:]
        if not args:
            continue
        prog, rest = args[0], args[1:]
        if prog == "petlbench":
            check_petlbench(rest, block.where)
        elif prog in ("pip", "pip3") and rest[:1] == ["install"]:
            check_pip_install(rest[1:], block.where)
        elif prog.startswith("python") and rest[:3] == ["-m", "pip", "install"]:
            check_pip_install(rest[3:], block.where)
        elif prog.startswith("python") and rest[:2] == ["-m", "pytest"]:
            for arg in rest[2:]:
                if arg.startswith("tests/"):
                    assert (ROOT / arg.split("::")[0]).exists(), f"{block.where}: {arg} does not exist"
        elif prog.startswith("python") and rest and rest[0].endswith(".py"):
            assert (ROOT / rest[0]).is_file(), f"{block.where}: {rest[0]} does not exist"
        elif "/" in prog and not prog.startswith(("/", "~")):
            assert os.access(ROOT / prog, os.X_OK), f"{block.where}: {prog} is not an executable in the repository"


# ------------------------------------------------------------------ running a page's blocks
def page_folder(base: Path) -> Path:
    """A folder that looks like the clone's root to repository-relative commands."""
    base.mkdir(parents=True)
    for name in LINKED:
        (base / name).symlink_to(ROOT / name)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, base / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, base / name)
    return base


def run_page(path: Path, folder: Path, cache: Path) -> list[str]:
    """Run the page's unmarked bash blocks in order; the failures, each with its output."""
    env = {**os.environ, "PETLBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PETLBENCH_SUITE_PATH", None)
    failures = []
    for block in blocks(path):
        if block.lang != "bash" or block.marker:
            continue
        try:
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {BLOCK_TIMEOUT_S} s)", -1
        if code != 0 or "Traceback (most recent call last)" in output:
            failures.append(f"{block.where}: exit status {code}\n--- block\n{block.text}\n--- output (end)\n"
                            f"{output[-3000:]}")
    return failures


def runnable(path: Path) -> bool:
    return any(b.lang == "bash" and not b.marker for b in blocks(path))


def cost(path: Path) -> int:
    """Roughly what running a page costs: its commands that start Python (each imports torch)."""
    return sum(1 for b in blocks(path) if b.lang == "bash" and not b.marker for args in simple_commands(b.text)
               if args[0] in ("petlbench", "python") or args[0].startswith("benchmarks/"))


@pytest.fixture(scope="module")
def page_results(request, tmp_path_factory) -> dict[Path, list[str]]:
    """Every selected page's blocks, run two pages at a time (each page alone in its folder, with
    its own ``PETLBENCH_CACHE``)."""
    wanted = [item.callspec.params["page"] for item in request.session.items
              if item.originalname == "test_command_blocks_run" and hasattr(item, "callspec")]
    wanted.sort(key=cost, reverse=True)  # the longest first, so the two workers finish together
    base = tmp_path_factory.mktemp("docs")
    folders = {page: page_folder(base / f"page{i}") for i, page in enumerate(wanted)}
    with ThreadPoolExecutor(max_workers=2) as pool:  # each page its own cache: no two builds of one cache
        futures = {page: pool.submit(run_page, page, folders[page], folders[page] / ".cache") for page in wanted}
        return {page: future.result() for page, future in futures.items()}


@pytest.mark.parametrize("page", [p for p in FILES if runnable(p)], ids=rel)
def test_command_blocks_run(page: Path, page_results: dict[Path, list[str]]) -> None:
    failures = page_results[page]
    assert not failures, "\n\n".join(failures)


def test_a_failing_block_fails(tmp_path) -> None:
    """The runner itself: a failing command, or a traceback with exit status 0, is a failure; a
    marked block and a block of another language are not run."""
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```bash\nfalse\necho unreachable\n```\n\n"
                    "```bash\n  # a comment, then a command that works\ntrue\n```\n\n"
                    "```bash\npython -c \"print('Traceback (most recent call last):')\"\n```\n\n"
                    "```bash\n# needs real data\nfalse\n```\n\n```text\nfalse\n```\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    failures = run_page(page, folder, tmp_path / "cache")
    assert [f.split(":", 2)[1] for f in failures] == ["3", "13"], failures
    assert "unreachable" not in failures[0].split("--- output (end)")[1]


@pytest.mark.parametrize("block", [b for p in FILES for b in blocks(p) if b.lang == "bash" and b.marker],
                         ids=lambda b: b.where)
def test_marked_blocks_name_real_commands(block: Block) -> None:
    check_statically(block)


def test_the_static_check_catches_what_it_should() -> None:
    """The checks of marked blocks are not vacuous (a wrong option, command, file, extra or pin fails)."""
    def fails(text: str) -> bool:
        try:
            check_statically(Block(ROOT / "README.md", 1, "bash", text))
        except (AssertionError, pytest.fail.Exception):
            return True
        return False

    assert not fails("# needs real data\npetlbench run --suite vtab --method arc --data-root /data \\\n  --seeds 0,1")
    assert fails("# needs real data\npetlbench run --suite vtab --metod arc")
    assert fails("# needs real data\npetlbench report --format docx")
    assert fails("# needs real data\npetlbench no-such-command")
    assert fails("# needs real data\npython benchmarks/no_such_script.py")
    assert fails("# installs packages\npip install -c constraints.txt -e \".[no_such_extra]\"")
    assert fails("# installs packages\npip install torch==0.0.1 && petlbench list methods")
    assert not fails("# installs packages\npip install -c constraints.txt -e \".[test]\" && python -m pytest")


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest' in readme
    assert 'pip install -c constraints.txt -e . && petlbench run --suite demo --method arc' in readme
    assert 'pip install --quiet -c constraints.txt -e ".[test]"' in ci and "python -m pytest" in ci
    assert any(line.startswith("if ! mkdocs build --strict") for line in ci), ".ci/run must build the docs strictly"


# ------------------------------------------------------------------ nav, links, anchors
def nav_files(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_files(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_files(value)


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config.get("docs_dir", "docs") == "docs"
    listed = list(nav_files(config["nav"]))
    assert len(listed) == len(set(listed)), "a page is listed twice in mkdocs.yml's nav"
    assert set(listed) == {p.name for p in PAGES}, (
        f"not in the nav: {sorted({p.name for p in PAGES} - set(listed))}; "
        f"no such page: {sorted(set(listed) - {p.name for p in PAGES})}")


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_relative_links_resolve(path: Path) -> None:
    for line, target in links(path):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{rel(path)}:{line}: link {target!r}"
        assert dest.exists(), f"{where}: no such file"
        if path.parent == DOCS:
            assert dest.parent == DOCS, f"{where}: a docs page may only link to docs pages (mkdocs builds docs/ alone)"
        if anchor:
            assert dest.suffix == ".md", f"{where}: an anchor into a file that is not a page"
            assert anchor in anchors(dest), f"{where}: no heading with the anchor #{anchor} in {rel(dest)}"


def test_slugs_are_the_ones_mkdocs_makes() -> None:
    assert slugify("Running petlbench's generic tests against your plugin") == \
        "running-petlbenchs-generic-tests-against-your-plugin"
    assert slugify("`petlbench data check`") == "petlbench-data-check"
    assert slugify("Packing: several seeds in one step") == "packing-several-seeds-in-one-step"


# ------------------------------------------------------------------ what the pages quote
def test_the_plugin_guide_quotes_the_examples_verbatim() -> None:
    guide = (DOCS / "plugins.md").read_text()
    for package, module in (("petlbench-outscale", "petlbench_outscale"), ("petlbench-gradshift", "petlbench_gradshift")):
        example = ROOT / "examples" / package
        assert (example / module / "__init__.py").read_text().strip() in guide, f"{package}'s code is not quoted as it is"
        assert (example / "pyproject.toml").read_text().strip() in guide, f"{package}'s pyproject.toml is not quoted"
    assert "[build-system]" in guide and '[project.entry-points."petlbench.methods"]' in guide


def builtins() -> dict[str, type[petlbench.Method]]:
    return {name: petlbench.get_method(name) for name in petlbench.list_methods()
            if petlbench.get_method(name).__module__.startswith("petlbench_methods")}


def readme_table(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table under ``## heading`` in the README."""
    text = (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows[2:]]


def names(cell: str) -> list[str]:
    return re.findall(r"`([a-z][a-z0-9_]*)`", cell)


def test_the_readme_methods_table_says_what_merges() -> None:
    methods, seen = builtins(), []
    for row in readme_table("Methods"):
        for name in names(row[0]):
            seen.append(name)
            assert row[2] == ("yes" if methods[name].mergeable else "no"), (name, row[2])
    assert sorted(seen) == sorted(methods), "each built-in method appears once in the README's methods table"
    readme = (ROOT / "README.md").read_text()
    merging = sum(m.mergeable for m in methods.values())
    assert f"Its {len(methods)} methods" in readme and f"The {merging} linear methods" in readme


#: The README's columns: the variants of tests/backbone_matrix.py each one stands for.
FAMILY_COLUMNS = {"ViT¹": ("vit", "clip", "dinov2_reg", "mae_gap", "no_bias", "non_square", "dynamic"),
                  "SigLIP": ("siglip",), "distilled DeiT": ("deit_distilled",), "EVA-02": ("eva02",),
                  "Swin": ("swin", "swin_non_square"), "ConvNeXt": ("convnext",)}


def matrix() -> dict[str, dict[str, str]]:
    """The generated table of docs/backbone-methods.md: method -> variant -> cell (note numbers dropped)."""
    text = (DOCS / "backbone-methods.md").read_text().split("<!-- backbone-matrix:begin", 1)[1]
    rows = [line for line in text.split("<!-- backbone-matrix:end", 1)[0].splitlines() if line.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = [[re.sub(r"\s*\[\d+\]$", "", c.strip()) for c in r.strip("|").split("|")] for r in rows[2:]]
    return {r[0]: dict(zip(head[1:], r[1:], strict=True)) for r in cells}


def test_the_readme_family_table_is_the_generated_matrix() -> None:
    generated, seen = matrix(), []
    header = "| methods | " + " | ".join(FAMILY_COLUMNS) + " | refused because |"
    assert header in (ROOT / "README.md").read_text()
    for row in readme_table("Methods x backbone families"):
        for name in names(row[0]):
            seen.append(name)
            for column, cell in zip(FAMILY_COLUMNS, row[1:], strict=False):
                want = {generated[name][v] for v in FAMILY_COLUMNS[column]}
                assert want == {cell}, (name, column, cell, want)
    assert sorted(seen) == sorted(builtins()), "each built-in method appears once in the README's family table"
