"""The her2 dataset plugin: the real her2st files (when present) and a tiny synthetic layout."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stbench.errors import DataError
from stbench_plugins.her2.reader import open_her2

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
real_data = pytest.mark.skipif(not REAL.is_dir(), reason=f"her2st data not found at {REAL} (../shared/data/her2st)")
slow = pytest.mark.slow  # parses all 36 real sections once per session (about 30 s)


def test_plugin_registers_the_dataset():
    from stbench_plugins import her2
    from stbench.specs import resolve

    specs = []
    her2.stbench_register_datasets(register=specs.append)
    assert [s.name for s in specs] == ["her2"]
    assert specs[0].needs_data_dir and "10.1038/s41467-021-26271-2" in specs[0].reference
    assert resolve(specs[0].factory) is open_her2


# --- real data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real dataset with every section loaded once, through the session's fresh cache (conftest's
    STBENCH_CACHE; the first parse is slow, later tests and runs read the cache)."""
    ds = open_her2(REAL)
    yield ds, {info.name: ds.load_section(info.name) for info in ds.sections()}


@real_data
def test_real_sections_patients_and_images():
    infos = open_her2(REAL).sections()
    assert len(infos) == 36
    assert infos[0].name == "A1" and infos[-1].name == "H3"
    assert sorted({i.patient for i in infos}) == list("ABCDEFGH")
    assert [i.name for i in infos if i.has_image] == ["C2", "C3", "C4", "C5", "C6"]


@real_data
@slow
def test_real_spot_totals(real):
    ds, sections = real
    assert sum(s.n_spots for s in sections.values()) == 13_620
    assert sum(q["n_spotfile_rows"] for q in ds.qc.values()) == 13_653
    assert sum(q["n_spotfile_rows_without_counts"] for q in ds.qc.values()) == 33


@real_data
@slow
def test_real_arrays_are_consistent(real):
    _, sections = real
    for s in sections.values():
        assert s.counts.shape == (s.n_spots, len(s.genes))
        assert s.counts.dtype.kind == "i" and s.counts.data.min() >= 0
        assert s.grid.shape == (s.n_spots, 2) and s.grid.dtype.kind == "i"
        assert s.pixel.shape == (s.n_spots, 2) and np.isfinite(s.pixel).all()
        assert [f"{x}x{y}" for x, y in s.grid] == list(s.spot_ids)
        assert 14_000 < len(s.genes) < 16_000
        assert (s.image_path is not None) == (s.name in {"C2", "C3", "C4", "C5", "C6"})
    # The join puts each spot-file row's pixel position on its counted spot.
    rows = pd.read_csv(REAL / "ST-spotfiles" / "A1_selection.tsv", sep="\t").set_index(["x", "y"])
    a1 = sections["A1"]
    x, y = a1.grid[0]
    assert np.allclose(a1.pixel[0], rows.loc[(x, y), ["pixel_x", "pixel_y"]].to_numpy(dtype=float))


@real_data
@slow
def test_real_scale_per_patient(real):
    _, sections = real
    a1, b1 = sections["A1"].mpp, sections["B1"].mpp
    assert abs(a1 - b1) / b1 > 0.15
    for s in sections.values():
        if s.patient == "A":
            assert 0.85 < s.mpp < 0.95, s.name
        else:
            assert 0.66 < s.mpp < 0.72, s.name


@real_data
@slow
def test_real_second_load_comes_from_the_cache(real, monkeypatch):
    ds, sections = real

    def refuse(*args, **kwargs):
        raise AssertionError("parsed again instead of reading the cache")

    monkeypatch.setattr(pd, "read_csv", refuse)
    monkeypatch.setattr(gzip, "open", refuse)
    again = ds.load_section("A1")
    assert (again.counts != sections["A1"].counts).nnz == 0
    assert list(again.genes) == list(sections["A1"].genes) and again.mpp == sections["A1"].mpp


# --- synthetic layout ----------------------------------------------------------------------------------

GENES = ["G1", "G2", "G3", "G4"]
PX_PER_STEP = {"A": 218.0, "B": 290.0}


def write_counts(path: Path, ids, genes, values, sep="\t"):
    lines = [sep + sep.join(genes)] + [sep.join([i, *map(str, row)]) for i, row in zip(ids, values)]
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def write_spots(path: Path, rows, columns=("x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, sep="\t", index=False)


def spot_rows(section: str, positions):
    """Spot-file rows for array positions, with ``pixel = s · (new − 1)`` as in the real files."""
    s = PX_PER_STEP[section[0]]
    rows = []
    for x, y in positions:
        new_x, new_y = x + 0.01 * ((x * 7 + y) % 3 - 1), y - 0.01 * ((x + y * 5) % 3 - 1)
        rows.append([x, y, new_x, new_y, round(s * (new_x - 1), 2), round(s * (new_y - 1), 2), 1])
    return rows


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A tiny her2st layout: A1 and B1 with 3x3 spots and 4 genes; one spot row without counts each."""
    monkeypatch.setenv("STBENCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "her2st"
    for sub in ("ST-cnts", "ST-spotfiles", "ST-imgs/B/B1"):
        (root / sub).mkdir(parents=True)
    (root / "ST-imgs/B/B1/slide.jpg").write_bytes(b"not decoded by these tests")
    rng = np.random.default_rng(0)
    for name in ("A1", "B1"):
        positions = [(x, y) for x in (5, 6, 7) for y in (10, 11, 12)]
        ids = [f"{x}x{y}" for x, y in positions]
        write_counts(root / f"ST-cnts/{name}.tsv.gz", ids, GENES, rng.integers(0, 5, (len(ids), len(GENES))))
        write_spots(root / f"ST-spotfiles/{name}_selection.tsv", spot_rows(name, positions + [(9, 9)]))
    return root


def counts_file(root, name="A1"):
    return root / "ST-cnts" / f"{name}.tsv.gz"


def spots_file(root, name="A1"):
    return root / "ST-spotfiles" / f"{name}_selection.tsv"


def test_synthetic_happy_path(fake):
    ds = open_her2(fake)
    assert [(i.name, i.patient, i.has_image) for i in ds.sections()] == [("A1", "A", False), ("B1", "B", True)]
    a1 = ds.load_section("A1")
    table = pd.read_csv(counts_file(fake), sep="\t", index_col=0)
    assert list(a1.spot_ids) == list(table.index) and list(a1.genes) == GENES
    assert np.array_equal(a1.counts.toarray(), table.to_numpy())
    assert a1.counts.dtype.kind == "i"
    assert a1.grid.tolist()[:2] == [[5, 10], [5, 11]]
    assert a1.pixel.shape == (9, 2) and a1.image_path is None
    assert ds.qc["A1"]["n_spotfile_rows_without_counts"] == 1
    assert a1.mpp == pytest.approx(200 / 218, rel=1e-3)
    assert (a1.lattice, a1.spot_diameter_um, a1.spot_pitch_um) == ("square", 100.0, 200.0)
    b1 = ds.load_section("B1")
    assert b1.mpp == pytest.approx(200 / 290, rel=1e-3)
    assert b1.image_path == fake / "ST-imgs/B/B1/slide.jpg"


def test_synthetic_parent_folder_and_default_dir(fake, monkeypatch):
    assert open_her2(fake.parent).root == fake  # the folder that holds her2st/ is accepted too
    monkeypatch.setenv("STBENCH_DATA", str(fake.parent))
    assert open_her2(None).root == fake


def test_synthetic_unselected_spots_are_dropped(fake):
    rows = pd.read_csv(spots_file(fake), sep="\t")
    rows.loc[0, "selected"] = 0
    rows.to_csv(spots_file(fake), sep="\t", index=False)
    ds = open_her2(fake)
    a1 = ds.load_section("A1")
    assert a1.n_spots == 8 and f"{rows.x[0]}x{rows.y[0]}" not in a1.spot_ids
    assert ds.qc["A1"]["n_unselected"] == 1


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("setting", ["missing", "incomplete", "env"])
def test_synthetic_data_dir_not_found(fake, tmp_path, monkeypatch, setting):
    if setting == "missing":
        target = tmp_path / "nowhere"
    elif setting == "incomplete":
        target = tmp_path / "incomplete"
        (target / "ST-cnts").mkdir(parents=True)
    else:
        monkeypatch.setenv("STBENCH_DATA", str(tmp_path / "empty"))
        target = None
    with pytest.raises(DataError) as excinfo:
        open_her2(target)
    expected = str(target) if target else str(tmp_path / "empty" / "her2st")
    assert_one_line_error(excinfo, expected, "ST-cnts/", "--data-dir", "$STBENCH_DATA")


def edit_counts(edit):
    """A breaker that rewrites A1's count table as ``edit(lines)`` returns it (header line first)."""

    def breaks(root):
        lines = gzip.decompress(counts_file(root).read_bytes()).decode().splitlines()
        counts_file(root).write_bytes(gzip.compress(("\n".join(edit(lines)) + "\n").encode()))

    return breaks


def set_count(value):
    """Put ``value`` at spot 5x11 (second data row), gene G2."""

    def edit(lines):
        fields = lines[2].split("\t")
        fields[2] = value
        return lines[:2] + ["\t".join(fields)] + lines[3:]

    return edit_counts(edit)


def edit_gz_bytes(edit):
    return lambda root: counts_file(root).write_bytes(edit(counts_file(root).read_bytes()))


def edit_spots(edit):
    """A breaker that rewrites A1's spot file as ``edit(table)`` returns it."""

    def breaks(root):
        edit(pd.read_csv(spots_file(root), sep="\t")).to_csv(spots_file(root), sep="\t", index=False)

    return breaks


def spots_only_at(positions):
    return lambda root: write_spots(spots_file(root), spot_rows("A1", positions))


def spots_as_csv(root):
    pd.read_csv(spots_file(root), sep="\t").to_csv(spots_file(root), sep=",", index=False)


def bad_selected_value(root):
    spots_file(root).write_text(spots_file(root).read_text().replace("\t1\n", "\toops\n", 1))


# (case, how to break A1, the file the message must name, fragments it must contain)
BROKEN = [
    ("count file missing", lambda r: counts_file(r).unlink(), "A1.tsv.gz", ["missing", "B1"]),
    ("truncated gzip", edit_gz_bytes(lambda b: b[:-20]), "A1.tsv.gz", ["cannot read", "EOFError"]),
    ("not gzip at all", edit_gz_bytes(lambda b: b"\tG1\n5x10\t1\n"), "A1.tsv.gz", ["cannot read", "Not a gzipped"]),
    ("corrupt gzip body", edit_gz_bytes(lambda b: b[:12] + b"\xff" * 40 + b[52:]), "A1.tsv.gz", ["cannot read"]),
    ("comma-separated", edit_counts(lambda ls: [line.replace("\t", ",") for line in ls]),
     "A1.tsv.gz", ["single column", "comma-separated", "tab-separated"]),
    ("ragged row", edit_counts(lambda ls: ls[:3] + [ls[3] + "\t1\t2"] + ls[4:]), "A1.tsv.gz", ["cannot read"]),
    ("non-numeric count", set_count("abc"), "A1.tsv.gz", ["non-numeric count 'abc' at spot '5x11', gene 'G2'"]),
    ("empty count", set_count(""), "A1.tsv.gz", ["missing (empty or NaN) count at spot '5x11', gene 'G2'"]),
    ("NA count", set_count("NA"), "A1.tsv.gz", ["missing (empty or NaN)"]),
    ("negative count", set_count("-3"), "A1.tsv.gz", ["negative count -3 at spot '5x11', gene 'G2'"]),
    ("fractional count", set_count("1.5"), "A1.tsv.gz", ["non-integer count 1.5"]),
    ("duplicated spot id", edit_counts(lambda ls: ls[:2] + ls[1:2] + ls[3:]), "A1.tsv.gz", ["duplicated spot", "5x10"]),
    ("duplicated gene", edit_counts(lambda ls: [ls[0].replace("G3", "G1")] + ls[1:]),
     "A1.tsv.gz", ["duplicated gene", "G1"]),
    ("malformed spot id", edit_counts(lambda ls: ls[:1] + ["spot1" + ls[1][4:]] + ls[2:]),
     "A1.tsv.gz", ["malformed spot id", "spot1"]),
    ("spot file missing", lambda r: spots_file(r).unlink(), "A1_selection.tsv", ["missing"]),
    ("spot file lacks columns", edit_spots(lambda t: t.drop(columns=["pixel_x", "new_y"])),
     "A1_selection.tsv", ["missing column(s) new_y pixel_x", "x y new_x new_y pixel_x pixel_y"]),
    ("spot file comma-separated", spots_as_csv, "A1_selection.tsv", ["missing column(s)", "comma-separated"]),
    ("spot file bad value", bad_selected_value, "A1_selection.tsv", ["column selected", "'oops'", "line 2"]),
    ("spot file duplicated position", spots_only_at([(5, 10), (5, 10)]), "A1_selection.tsv", ["duplicated spot"]),
    ("spot ids do not join", spots_only_at([(x, y) for x in (5, 6, 7) for y in (10, 11)]),
     "A1_selection.tsv", ["do not join", "A1.tsv.gz", "5x12"]),
]


@pytest.mark.parametrize("name,breaks,filename,fragments", BROKEN, ids=[b[0] for b in BROKEN])
def test_synthetic_malformed_input_is_a_one_line_data_error(fake, name, breaks, filename, fragments):
    breaks(fake)
    with pytest.raises(DataError) as excinfo:
        open_her2(fake).load_section("A1")
    assert_one_line_error(excinfo, filename, *fragments)
    assert "Traceback" not in str(excinfo.value)


def cache_entries(fake, name="A1"):
    return sorted((fake.parent / "cache" / "her2").glob(f"{name}-*.npy"))


def test_synthetic_second_load_reads_the_cache(fake, monkeypatch):
    first = open_her2(fake).load_section("A1")
    assert len(cache_entries(fake)) == 1
    monkeypatch.setattr(pd, "read_csv", lambda *a, **k: pytest.fail("parsed again"))
    again = open_her2(fake).load_section("A1")
    assert np.array_equal(again.counts.toarray(), first.counts.toarray())
    assert again.mpp == first.mpp and list(again.spot_ids) == list(first.spot_ids)


def test_synthetic_changed_count_file_is_parsed_again(fake):
    ds = open_her2(fake)
    first = ds.load_section("A1")
    ids, values = list(first.spot_ids), first.counts.toarray() + 100
    write_counts(counts_file(fake), ids, GENES, values)
    stat = counts_file(fake).stat()
    os.utime(counts_file(fake), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock must not hide it
    again = ds.load_section("A1")
    assert np.array_equal(again.counts.toarray(), values)
    assert len(cache_entries(fake)) == 1  # the stale entry was removed


def test_synthetic_cache_of_an_older_format_is_replaced(fake):
    first = open_her2(fake).load_section("A1")
    [entry] = cache_entries(fake)
    old = entry.with_name(entry.name.rsplit("-", 1)[0] + "-0123456789abcdef.npz")  # CACHE_VERSION 2's name
    old.write_bytes(b"PK")
    entry.unlink()
    open_her2(fake).load_section("A1")  # parsed again: the npz entry goes, one .npy entry stays
    assert not old.exists() and len(cache_entries(fake)) == 1


def test_synthetic_cache_with_trailing_bytes_is_parsed_again(fake, monkeypatch):
    open_her2(fake).load_section("A1")
    [entry] = cache_entries(fake)
    entry.write_bytes(entry.read_bytes() + b"x")  # e.g. two writers' records in one file
    parsed = []
    original = pd.read_csv
    monkeypatch.setattr(pd, "read_csv", lambda *a, **k: parsed.append(1) or original(*a, **k))
    open_her2(fake).load_section("A1")
    assert parsed


def test_synthetic_corrupt_cache_is_parsed_again(fake):
    first = open_her2(fake).load_section("A1")
    [entry] = cache_entries(fake)
    entry.write_bytes(entry.read_bytes()[:100])
    again = open_her2(fake).load_section("A1")
    assert np.array_equal(again.counts.toarray(), first.counts.toarray())
    assert entry.stat().st_size > 1000  # rewritten whole
    assert open_her2(fake).load_section("A1").counts.nnz == first.counts.nnz
