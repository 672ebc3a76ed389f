"""Every relative link and image in README.md, docs/ and the node help pages resolves: the file (or
folder) exists in the repository and, for a `#anchor`, the heading it names exists. A link to this
repository on GitHub (`.../blob/main/PATH`) is checked the same way, since the help pages, which
ComfyUI's node library shows, cannot use relative links. The pack's web directory holds a help page
for each of its nodes, where ComfyUI's frontend looks for it.

Engine-level: nothing here needs ComfyUI, except the last test, which reads the nodes' own inputs.
"""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import PACK_ROOT

REPO_URL = "https://github.com/comfyui-tgate/ComfyUI-TGATE"
NODE_IDS = ("TGate", "TGateAdvanced", "TGateProbe")


def pack_web_directory() -> Path | None:
    """The folder the pack's __init__.py exports as WEB_DIRECTORY, resolved as ComfyUI resolves it."""
    spec = importlib.util.spec_from_file_location("comfyui_tgate_init", PACK_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports nothing from ComfyUI: the nodes load in comfy_entrypoint
    web = getattr(module, "WEB_DIRECTORY", None)
    return None if web is None else (PACK_ROOT / web).resolve()


WEB_DIR = pack_web_directory() or (PACK_ROOT / "web").resolve()  # test_the_web_directory_... fails without it


def documents(root: Path = PACK_ROOT) -> list[Path]:
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    web = WEB_DIR if root == PACK_ROOT else root / "web"
    return pages + sorted(web.rglob("*.md"))


# -- parsing -----------------------------------------------------------------------------------
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1", re.S)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE = re.compile(r"(!?)\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HTML_ATTR = re.compile(r"<(img|a|source|video)\b[^>]*?\s(src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def strip_code(text: str) -> str:
    """The text without fenced code blocks, code spans and comments, where a [x](y) is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", HTML_COMMENT.sub("", text)))


def links(text: str) -> list[tuple[str, bool]]:
    """(target, is an image) for every link and image of a markdown text."""
    text = strip_code(text)
    found = [(m.group(2).strip("<>"), m.group(1) == "!") for m in INLINE.finditer(text)]
    found += [(m.group(1).strip("<>"), False) for m in REFERENCE.finditer(text)]
    found += [(m.group(3), m.group(1).lower() != "a") for m in HTML_ATTR.finditer(text)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def repo_path(target: str) -> str | None:
    """The path inside this repository of a link to it on GitHub (blob or tree on main), else None."""
    for kind in ("blob", "tree"):
        prefix = f"{REPO_URL}/{kind}/main/"
        if target.startswith(prefix):
            return unquote(urlsplit(target[len(prefix) :]).path)
    return None


# -- checking ----------------------------------------------------------------------------------
def problems(page: Path, root: Path = PACK_ROOT, web_dir: Path | None = None) -> list[str]:
    """What is wrong with the links of one page: a missing file, a missing heading, and, on a node
    help page (under `web_dir`), a relative link the node docs panel cannot follow."""
    web_dir = web_dir or (WEB_DIR if root == PACK_ROOT else root / "web")
    is_help = web_dir in page.resolve().parents
    found = []
    for target, image in links(page.read_text(encoding="utf-8")):
        where = f"{page.relative_to(root)}: {target}"
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            inside = repo_path(target)
            if inside is None:
                continue  # another site: not checked here
            resolved = root / inside
        elif not parts.path:
            resolved = page  # "#anchor" in the same page
            if is_help:
                found.append(f"{where}: an anchor in a node help page points into ComfyUI's own page")
                continue
        else:
            resolved = (page.parent / unquote(parts.path)).resolve()
            if is_help and not image:
                found.append(f"{where}: the node docs panel resolves relative links against ComfyUI's page; link to GitHub")
                continue
            if is_help and web_dir not in resolved.parents:
                found.append(f"{where}: outside the web directory, so ComfyUI does not serve it")
                continue
        if root.resolve() not in (resolved.resolve(), *resolved.resolve().parents):
            found.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            found.append(f"{where}: no such file")
        elif parts.fragment and resolved.suffix == ".md" and unquote(parts.fragment) not in anchors(resolved):
            found.append(f"{where}: no heading #{parts.fragment} in {resolved.relative_to(root.resolve())}")
    return found


@pytest.mark.parametrize("page", documents(), ids=lambda p: str(p.relative_to(PACK_ROOT)))
def test_every_relative_link_and_image_resolves(page):
    assert problems(page) == []


def test_every_docs_page_is_reachable_from_the_readme():
    """README links to each page under docs/ and the web directory, directly or through pages it links
    to (a link to a folder reaches the files in it, which GitHub lists)."""
    reached, todo = set(), [PACK_ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        if page.is_dir():
            todo += [p.resolve() for p in page.iterdir() if p.suffix == ".md"]
            continue
        if page.suffix != ".md" or not page.is_file():
            continue
        for target, _ in links(page.read_text(encoding="utf-8")):
            inside = repo_path(target)
            if inside is not None:
                todo.append((PACK_ROOT / inside).resolve())
            elif not urlsplit(target).scheme and urlsplit(target).path:
                todo.append((page.parent / unquote(urlsplit(target).path)).resolve())
    unreached = [str(p.relative_to(PACK_ROOT)) for p in documents() if p.resolve() not in reached]
    assert unreached == []


def test_the_readme_reads_in_minutes_and_keeps_the_test_command():
    readme = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < 15_000
    # .ci/run runs "the test command written in README.md"
    assert "```bash\npip install -r requirements-dev.txt && python -m pytest\n```" in readme
    assert "python -m pytest" in (PACK_ROOT / ".ci" / "run").read_text()


# -- the checker itself fails on what it must catch ---------------------------------------------
def test_the_checker_reports_broken_links_images_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "web" / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Real heading\n")
    (tmp_path / "web" / "docs" / "shot.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#real-heading) [ok](#top) ![ok](web/docs/shot.png)\n"
        "[gone](docs/missing.md) ![gone](docs/missing.png) [bad anchor](docs/page.md#no-such-heading)\n"
        '<img src="docs/nothing.jpg"> [ok](https://example.com/x.md) [gone](../../outside.md)\n'
        f"[gone]({REPO_URL}/blob/main/docs/absent.md)\n"
        "```\n[not a link](in/a/code/block.md)\n```\n`[not a link](in/a/span.md)`\n\n# Top\n"
    )
    (tmp_path / "web" / "docs" / "Node.md").write_text(
        f"# Node\n\n![ok](shot.png) [ok]({REPO_URL}/blob/main/docs/page.md)\n"
        "[relative](../../docs/page.md) ![outside](../../docs/page.md) [anchor](#node)\n"
    )
    readme = problems(tmp_path / "README.md", root=tmp_path)
    assert sorted(p.split(": ")[1] for p in readme) == sorted(
        [
            "docs/missing.md",
            "docs/missing.png",
            "docs/page.md#no-such-heading",
            "../../outside.md",
            "docs/nothing.jpg",
            f"{REPO_URL}/blob/main/docs/absent.md",
        ]
    ), readme
    help_page = problems(tmp_path / "web" / "docs" / "Node.md", root=tmp_path)
    assert [p.split(": ")[1] for p in help_page] == ["../../docs/page.md", "../../docs/page.md", "#node"], help_page


def test_slugs_follow_github():
    assert slug("T-GATE (advanced) (`TGateAdvanced`): TGATE-V2") == "t-gate-advanced-tgateadvanced-tgate-v2"
    assert slug("On a trained model: does T-GATE keep the prompt?") == "on-a-trained-model-does-t-gate-keep-the-prompt"
    assert slug("With torch.compile (TorchCompileModel)") == "with-torchcompile-torchcompilemodel"


# -- the help pages ComfyUI's node library shows --------------------------------------------------
def test_the_web_directory_holds_a_help_page_per_node():
    """ComfyUI 0.3.64 serves WEB_DIRECTORY at /extensions/<pack folder>/, and its frontend (1.27) asks
    for /extensions/<pack folder>/docs/<node id>/<locale>.md, then docs/<node id>.md."""
    assert pack_web_directory() == WEB_DIR, "__init__.py exports no WEB_DIRECTORY"
    assert WEB_DIR.is_dir() and WEB_DIR != PACK_ROOT.resolve()  # never the whole repository
    for node_id in NODE_IDS:
        page = WEB_DIR / "docs" / f"{node_id}.md"
        assert page.is_file(), page
        assert page.read_text(encoding="utf-8").startswith("# "), page


def _rows(page: str) -> dict[str, list[str]]:
    """{first cell without backticks: cells} of every table row of a page."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[re.match(r"`([^`]+)`", cells[0]).group(1)] = cells
    return rows


def test_each_help_page_lists_every_input_with_the_node_s_default_and_range(comfy):
    """The inputs table of each help page against the node's own schema: every input, its default
    and its range or choices, so that a changed default in the code turns this red."""
    ids = [i for i in NODE_IDS if i in comfy.nodes.NODE_CLASS_MAPPINGS]
    assert ids == list(NODE_IDS)
    for node_id in ids:
        node = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        rows = _rows((WEB_DIR / "docs" / f"{node_id}.md").read_text(encoding="utf-8"))
        for section, inputs in node.INPUT_TYPES().items():
            for name, spec in inputs.items():
                assert name in rows, f"{node_id}.md has no row for input {name}"
                _, kind, default, *_ = rows[name]
                options = spec[1] if len(spec) > 1 else {}
                choices = spec[0] if isinstance(spec[0], list) else None
                if "default" in options:
                    value = options["default"]
                    shown = default.strip("`").split(" ")[0]
                    same = float(shown) == value if isinstance(value, (int, float)) else shown == value
                    assert same, (node_id, name, default)
                else:
                    assert default == "", (node_id, name, default)
                if choices is not None and len(choices) <= 8:
                    assert [c.strip("` ") for c in kind.split("/")] == choices, (node_id, name, kind)
                elif choices is None:
                    assert kind.split(" ")[0] == spec[0], (node_id, name, kind)
                    low, high = options.get("min"), options.get("max")
                    if low is not None and high is not None and high < 1e6:
                        assert f"{low}–{high}" in kind, (node_id, name, kind)
                assert ("optional" in kind) == (section == "optional"), (node_id, name, kind)
        for output in node.RETURN_NAMES:
            assert output in rows, f"{node_id}.md has no row for output {output}"
