"""The benchmark image builder's pure parts: diffing two trees into an app layer (changes, parents,
whiteouts, hard links), packing layers (PAX tar, sorted, numeric owners, deterministic gzip) and applying
them again; the extracted result must equal the tree that was diffed."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from bench import realistic as rl

MTIME = 1_600_000_000


def _file(root: Path, rel: str, data: bytes = b"x", mode: int = 0o644, mtime: int = MTIME) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.utime(path, (mtime, mtime))


def _before_tree(root: Path) -> None:
    _file(root, "bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
    os.symlink("tool", root / "bin/alias")
    _file(root, "etc/motd", b"hello\n")
    _file(root, "etc/keep", b"unchanged\n")
    _file(root, "etc/same-size", b"aaaa")
    _file(root, "var/cache/apt/pkgcache.bin", b"cache" * 100)
    _file(root, "var/cache/apt/archives/a.deb", b"deb-a")
    _file(root, "var/cache/apt/archives/b.deb", b"deb-b")
    _file(root, "old/dir/deep/file", b"deep")
    _file(root, "becomes-dir", b"a file for now")
    _file(root, "becomes-file/child", b"child")
    _file(root, "lib/shared", b"shared data")
    os.link(root / "lib/shared", root / "lib/shared-link")
    (root / "dev").mkdir()
    (root / "dev/ignored").write_bytes(b"never packed")


def _change(root: Path) -> None:
    (root / "etc/motd").unlink()
    _file(root, "etc/same-size", b"bbbb")  # same size and mtime: only the content differs
    shutil.rmtree(root / "var/cache/apt/archives")
    (root / "var/cache/apt/pkgcache.bin").unlink()
    shutil.rmtree(root / "old/dir")
    (root / "becomes-dir").unlink()
    _file(root, "becomes-dir/inside", b"now a directory")
    shutil.rmtree(root / "becomes-file")
    _file(root, "becomes-file", b"now a file")
    _file(root, "usr/lib/python3/mod.py", b"print('new')\n")
    os.link(root / "usr/lib/python3/mod.py", root / "usr/lib/python3/mod-link.py")
    _file(root, "app/run.sh", b"#!/bin/sh\necho READY\n", 0o755)
    os.symlink("/app/run.sh", root / "bin/run")
    (root / "dev/ignored").write_bytes(b"changed, still never packed")


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    _before_tree(before)
    subprocess.run(["cp", "-a", str(before), str(after)], check=True)
    _change(after)
    return before, after


def _view(root: Path) -> dict[str, tuple]:
    """What a container sees: kind, mode, size, content hash or link target (dir mtimes excluded)."""
    out = {}
    for path, meta in rl.scan(root).items():
        if meta.kind == "reg":
            digest = hashlib.sha256((root / path).read_bytes()).hexdigest()
            out[path] = ("reg", meta.mode, meta.size, meta.mtime_ns // 10**9, digest)
        elif meta.kind == "symlink":
            out[path] = ("symlink", meta.target)
        else:
            out[path] = (meta.kind, meta.mode)
    return out


def _layers(before: Path, after: Path, out: Path, **kw) -> tuple[rl.LayerBlob, rl.LayerBlob, rl.TreeDiff]:
    base_entries = [rl.LayerEntry(p) for p in sorted(rl.scan(before), key=rl._path_key)]
    base = rl.write_layer(before, base_entries, out / "base.tar.gz")
    after_scan = rl.scan(after)
    diff = rl.diff_trees(before, after, after=after_scan, **kw)
    app = rl.write_layer(after, diff.layer_entries(after_scan), out / "app.tar.gz")
    return base, app, diff


def _members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(blob, "r:gz") as tar:
        return tar.getmembers()


def test_diff_lists_changes_and_topmost_deletions(trees):
    before, after = trees
    diff = rl.diff_trees(before, after)
    # one whiteout for a deleted directory, none for what it held; none for becomes-file/child either:
    # its parent is now a file, which hides the old directory
    assert set(diff.deleted) == {
        "etc/motd",
        "var/cache/apt/archives",
        "var/cache/apt/pkgcache.bin",
        "old/dir",
    }
    assert "etc/same-size" in diff.changed  # equal size and mtime, other bytes
    assert "etc/keep" not in diff.changed and "bin/tool" not in diff.changed
    assert {"becomes-dir", "becomes-dir/inside", "becomes-file", "app/run.sh", "bin/run"} <= set(diff.changed)
    assert not any(p.startswith("dev/") for p in diff.changed + diff.deleted)


def test_unchanged_copy_has_an_empty_diff(tmp_path: Path):
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    _before_tree(before)
    subprocess.run(["cp", "-a", str(before), str(after)], check=True)
    assert rl.diff_trees(before, after) == rl.TreeDiff((), ())


def test_only_files_touched_since_the_copy_are_read(tmp_path: Path):
    before, after = tmp_path / "before", tmp_path / "after"
    _file(before, "f", b"aaaa")
    subprocess.run(["cp", "-a", str(before), str(after)], check=True)
    _file(after, "f", b"bbbb")  # same size, mtime put back: only the ctime tells
    assert rl.diff_trees(before, after, touched_since_ns=time.time_ns() - 10**9).changed == ("f",)
    assert rl.diff_trees(before, after, touched_since_ns=time.time_ns() + 10**9).changed == ()


def test_layer_entries_carry_parents_and_whiteouts_in_tar_order(trees):
    before, after = trees
    after_scan = rl.scan(after)
    entries = rl.diff_trees(before, after, after=after_scan).layer_entries(after_scan)
    names = [e.tar_name for e in entries]
    assert names == sorted(names, key=rl._path_key)
    assert {"etc/.wh.motd", "var/cache/apt/.wh.archives", "old/.wh.dir"} <= set(names)
    for parent in ("usr", "usr/lib", "usr/lib/python3", "app", "var", "var/cache", "var/cache/apt", "old"):
        assert parent in names, parent
    assert names.index("usr") < names.index("usr/lib/python3/mod.py")


def test_layers_applied_in_order_give_the_after_tree(trees, tmp_path: Path):
    before, after = trees
    base, app, _ = _layers(before, after, tmp_path)
    out = tmp_path / "extracted"
    rl.extract_layers([base.path, app.path], out)
    want = {p: v for p, v in _view(after).items() if not p.startswith("dev/")}
    assert _view(out) == want
    assert app.whiteouts == 4


def test_layer_tar_format(trees, tmp_path: Path):
    before, after = trees
    base, app, _ = _layers(before, after, tmp_path)
    members = _members(app.path)
    names = [m.name.rstrip("/") for m in members]
    assert names == sorted(names, key=rl._path_key)
    assert all(m.uname == "" and m.gname == "" for m in members)
    whiteout = next(m for m in members if m.name == "etc/.wh.motd")
    assert whiteout.isreg() and whiteout.size == 0
    link = next(m for m in members if m.name == "usr/lib/python3/mod.py")
    assert link.islnk() and link.linkname == "usr/lib/python3/mod-link.py"  # first name in tar order
    base_members = {m.name.rstrip("/"): m for m in _members(base.path)}
    assert (
        base_members["lib/shared-link"].islnk() and base_members["lib/shared-link"].linkname == "lib/shared"
    )
    assert "dev" in base_members and "dev/ignored" not in base_members
    raw = gzip.decompress(app.path.read_bytes())
    assert app.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert app.uncompressed_size == len(raw) and raw.endswith(b"\0" * 1024)
    assert app.digest == "sha256:" + hashlib.sha256(app.path.read_bytes()).hexdigest()
    assert app.size == app.path.stat().st_size
    assert app.path.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime 0


def test_packing_is_deterministic(trees, tmp_path: Path):
    before, after = trees
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = _layers(before, after, tmp_path / "one")
    second = _layers(before, after, tmp_path / "two")
    assert [x.digest for x in first[:2]] == [x.digest for x in second[:2]]


def test_extract_applies_opaque_directories(tmp_path: Path):
    def layer(name: str, members: list[tuple[str, bytes]]) -> Path:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member_name, data in members:
                info = tarfile.TarInfo(member_name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path = tmp_path / name
        path.write_bytes(gzip.compress(buf.getvalue()))
        return path

    lower = layer("lower.tar.gz", [("d/old", b"old"), ("d/sub/x", b"x"), ("keep", b"k")])
    upper = layer("upper.tar.gz", [("d/.wh..wh..opq", b""), ("d/new", b"new")])
    out = tmp_path / "out"
    rl.extract_layers([lower, upper], out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["d", "d/new", "keep"]


def test_recipe_keys_are_stable_and_distinct():
    keys = {name: recipe.key() for name, recipe in rl.RECIPES.items()}
    assert len(set(keys.values())) == len(keys)
    assert keys == {name: recipe.key() for name, recipe in rl.RECIPES.items()}
    for name in ("python-numpy", "python-scipy", "jre", "gcc", "node", "big-app", "small"):
        recipe = rl.RECIPES[name]
        assert recipe.command
        workload = b"".join(c for _, c, _ in recipe.files) + b"".join(c for _, c in recipe.java)
        assert b"READY" in workload, name
    big = rl.RECIPES["big-app"]
    assert sum(a.count * a.size for a in big.assets) > 1_000_000_000


def test_built_image_config_and_json_round_trip(tmp_path: Path):
    layer = rl.LayerBlob(
        tmp_path / "images/x/app.tar.gz", "sha256:" + "a" * 64, 10, "sha256:" + "b" * 64, 20, 3, 1
    )
    image = rl.BuiltImage(
        "x", "f" * 64, tmp_path / "images/x", (layer,), ("python3", "/app/main.py"), rl.IMAGE_ENV, "demo"
    )
    image.directory.mkdir(parents=True)
    image.save(tmp_path)
    loaded = rl.BuiltImage.load(image.directory, tmp_path)
    assert loaded == image
    config = image.config()
    assert config["rootfs"]["diff_ids"] == [layer.diff_id]
    assert config["config"]["Cmd"] == ["python3", "/app/main.py"] and config["config"]["WorkingDir"] == "/app"
    assert image.tag == "f" * 16


def test_umoci_recipes_repack_their_source(monkeypatch):
    for name in ("python-numpy-umoci", "small-umoci"):
        recipe = rl.RECIPES[name]
        source = rl.RECIPES[recipe.source]
        assert recipe.packer == "umoci" and not source.packer
        assert recipe.command == source.command and recipe.base == source.base
        assert recipe.key() != source.key()
    # the key follows the source recipe: a changed source builds the repacked image anew
    before = rl.RECIPES["small-umoci"].key()
    monkeypatch.setitem(rl.RECIPES, "small", dataclasses.replace(rl.RECIPES["small"], removes=()))
    assert rl.RECIPES["small-umoci"].key() != before


def test_unknown_packer_is_refused(tmp_path: Path, monkeypatch):
    bad = dataclasses.replace(rl.RECIPES["small-umoci"], name="bad", packer="kaniko")
    monkeypatch.setitem(rl.RECIPES, "bad", bad)
    with pytest.raises(rl.BuildError, match="unknown packer 'kaniko'"):
        rl.build("bad", tmp_path)
