"""The repository stands alone: nothing it tracks points outside it, and its modules stay small."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".cfg", ".sh", ".yml", ".yaml", ".conf", ""}
MAX_MODULE_LINES = 500


def _outside_paths() -> list[str]:
    """What a file would name to reach beside this checkout: the checkout's parent folder by its absolute path,
    and each folder beside the checkout as ``../<name>/`` (names that are also top-level folders of the repository
    are left out: ``../bundles/`` from ``docs/`` stays inside)."""
    inside = {p.name for p in REPO.iterdir()}
    beside = [f"../{p.name}/" for p in REPO.parent.iterdir() if p.is_dir() and p != REPO and p.name not in inside]
    return beside + ([f"{REPO.parent}/"] if len(REPO.parent.parts) > 1 else [])


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if line]


def test_no_tracked_file_points_outside_the_repository():
    """No tracked text file (docs, configs, tests, code) names a folder beside the checkout or its absolute path."""
    outside, offenders = _outside_paths(), []
    for path in _tracked_files():
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or "tests/data" in path.as_posix():
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(REPO)}: {needle}" for needle in outside if needle in text]
    assert not offenders, "files that point outside the repository:\n" + "\n".join(offenders)


def test_no_data_prep_module_over_500_lines():
    """Every module of data_prep has at most 500 lines (the package is split along the pipeline)."""
    long = {
        p.relative_to(REPO).as_posix(): n
        for p in (REPO / "data_prep").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"data_prep modules over {MAX_MODULE_LINES} lines: {long}"


def test_real_test_data_is_in_the_repository_with_attribution():
    """The real LIDC-IDRI runs (DICOM + XML reads) and the nodule patches are tracked, each folder with a README naming its licence."""
    tracked = {p.relative_to(REPO).as_posix() for p in _tracked_files()}
    sample = [t for t in tracked if t.startswith("tests/data/lidc_idri_sample/")]
    assert sum(t.endswith(".dcm") for t in sample) == 39 and sum(t.endswith(".xml") for t in sample) == 3
    patches = [t for t in tracked if t.startswith("tests/data/node21_nodule_patches/patches/")]
    assert len(patches) == 32  # 16 CT patches and their 16 masks
    for folder in ("lidc_idri_sample", "node21_nodule_patches"):
        assert "CC BY" in (REPO / "tests" / "data" / folder / "README.md").read_text()
    assert "Armato" in (REPO / "tests" / "data" / "lidc_idri_sample" / "ATTRIBUTION").read_text()
