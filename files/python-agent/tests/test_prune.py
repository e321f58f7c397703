"""Retention by the date in the file name, layout matching, dry-run, compression, symlinks."""

import datetime as dt
import gzip
import os

import pytest
import zstandard

from keplerlog.layout import Layout
from keplerlog.prune.main import main
from keplerlog.prune.retention import compress, run

TODAY = dt.date(2024, 3, 31)
LAYOUT = Layout("{service}/{module}.{day}")


def make(root, rel, data=b"line\n"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path)  # fresh mtime everywhere: age must come from the name
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    names = {
        "old": [
            "shop/portal.20240229",
            "shop/portal.20240101.gz",
            "shop/a.b.20240228.zst",
            "_quarantine/20240201",
        ],
        "keep": [
            "shop/portal.20240301",
            "shop/portal.20240331",
            "shop/portal.20240315.gz",
            "_quarantine/20240330",
        ],
        "foreign": [
            "shop/portal.log",
            "shop/portal.2024022",
            "shop/.portal.20240101",
            "notes.20240101",
            "a/b/c.20240101",
            "shop/portal.20240101.bak",
            ".keplerlog/state/x.20240101",
        ],
    }
    for group in names.values():
        for rel in group:
            make(root, rel)
    outside = make(tmp_path, "outside/victim.20200101")
    (root / "linked").symlink_to(outside.parent)
    (root / "shop" / "ln.20200101").symlink_to(outside)
    return root, names, outside


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_deletes_exactly_the_expired_files(tree):
    root, names, outside = tree
    report = run(str(root), LAYOUT, 30, now=TODAY)
    assert report.deleted == len(names["old"])
    remaining = listing(root)
    assert not set(names["old"]) & set(remaining)
    assert set(names["keep"]) | set(names["foreign"]) <= set(remaining)
    assert outside.exists() and (root / "shop" / "ln.20200101").is_symlink()


def test_dry_run_changes_nothing(tree, caplog):
    root, names, _ = tree
    before = listing(root)
    caplog.set_level("INFO")
    report = run(str(root), LAYOUT, 30, now=TODAY, dry_run=True, compress_after=7)
    assert listing(root) == before
    assert report.deleted == len(names["old"])
    assert sum("would delete" in r.message for r in caplog.records) == len(names["old"])


def test_flat_layout(tmp_path):
    root = tmp_path / "r"
    make(root, "portal.20240101")
    make(root, "portal.20240330")
    make(root, "shop/portal.20240101")
    run(str(root), Layout("{module}.{day}"), 30, now=TODAY)
    assert listing(root) == ["portal.20240330", "shop/portal.20240101"]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_compression_then_retention(tmp_path, kind):
    root = tmp_path / "r"
    data = b"".join(b"line %d\n" % i for i in range(1000))
    make(root, "shop/portal.20240320", data)
    make(root, "shop/portal.20240330", data)
    make(root, "shop/portal.20240331", data)
    report = run(str(root), LAYOUT, 30, now=TODAY, compress_after=1, compression=kind)
    assert report.compressed == 1
    ext = ".gz" if kind == "gzip" else ".zst"
    assert listing(root) == [f"shop/portal.20240320{ext}", "shop/portal.20240330", "shop/portal.20240331"]
    blob = (root / f"shop/portal.20240320{ext}").read_bytes()
    zstd = zstandard.ZstdDecompressor().decompressobj()
    raw = gzip.decompress(blob) if kind == "gzip" else zstd.decompress(blob)
    assert raw == data
    # A late line reopened the compressed day: the new part is appended as another member.
    make(root, "shop/portal.20240320", b"late\n")
    run(str(root), LAYOUT, 30, now=TODAY, compress_after=1, compression=kind)
    if kind == "gzip":
        assert gzip.decompress((root / "shop/portal.20240320.gz").read_bytes()) == data + b"late\n"
    # Retention counts compressed files too.
    run(str(root), LAYOUT, 5, now=TODAY)
    assert listing(root) == ["shop/portal.20240330", "shop/portal.20240331"]


def test_compress_is_atomic_on_failure(tmp_path, monkeypatch):
    path = make(tmp_path, "m.20240101", b"x\n")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        compress(str(path), "gzip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.20240101"]


def test_cli(tree, tmp_path, capsys):
    root, names, _ = tree
    assert main(["--root", str(root), "--days", "30", "--dry-run"]) == 0
    assert main(["--root", str(tmp_path / "missing"), "--days", "3"]) == 2
    assert main(["--root", str(root), "--days", "3", "--layout", "../{day}"]) == 2
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"root: {root}\nlayout: '{{service}}/{{module}}.{{day}}'\n")
    assert main(["--config", str(cfg), "--days", "100000"]) == 0
    assert set(names["old"]) <= set(listing(root))


def test_audit_reports_go_with_their_day(tmp_path):
    root = tmp_path / "root"
    old = make(root, ".keplerlog/audit/20240229/keplerlog-0.json", b"{}")
    make(root, ".keplerlog/audit/20240229/keplerlog-1.json", b"{}")
    kept = make(root, ".keplerlog/audit/20240301/keplerlog-0.json", b"{}")
    odd = make(root, ".keplerlog/audit/20240101/notes.txt")  # not only reports: left alone
    other = make(root, ".keplerlog/audit/notes/keplerlog-0.json", b"{}")
    outside = make(tmp_path, "outside/20200101/keplerlog-0.json", b"{}")
    (root / ".keplerlog/audit/20200101").symlink_to(outside.parent)
    dry = run(str(root), LAYOUT, 30, now=TODAY, dry_run=True)
    assert dry.audit_days == 1 and old.exists()
    report = run(str(root), LAYOUT, 30, now=TODAY)
    assert report.audit_days == 1
    assert not old.parent.exists()
    assert kept.exists() and odd.exists() and other.exists() and outside.exists()
    assert (root / ".keplerlog/audit/20200101").is_symlink()
