"""Row deletion in the feature store: tombstones (checksummed, excluded from live positions, kept across appends)
and compaction (the rows gone for good, crash-safe at each step, statistics made stale, FAISS told to rebuild)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from influence.errors import (
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
)
from influence.index import LayerIndex, build_store_indexes, load_store_indexes
from influence.store import FeatureStore
from tests.influence.test_store import LAYERS, build, chunk_data, expected, make_manifest


def _flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix == ".npy")


def _meanwhile(monkeypatch: pytest.MonkeyPatch, other_process: Callable[[Path], None]) -> None:
    """Each time a compaction has written its new segment files (before it switches to them), `other_process`
    acts on the store's folder, as a request of another process would."""
    original = FeatureStore._write_segment_files

    def write_then_act(self, *args, **kwargs):
        record = original(self, *args, **kwargs)
        other_process(self.path)
        return record

    monkeypatch.setattr(FeatureStore, "_write_segment_files", write_then_act)


def test_tombstones_are_recorded_checksummed_and_excluded(tmp_path: Path) -> None:
    store = build(tmp_path / "s")
    ids, _ = expected(store.manifest)
    assert store.deleted_row_ids().size == 0 and np.array_equal(store.live_positions(), np.arange(50))
    assert not store.changed()
    assert store.delete_rows([1003, 1010, 1003]) == 2
    assert store.delete_rows(np.array([1010, 1011])) == 1  # 1010 again: ignored
    assert store.delete_rows([]) == 0
    with pytest.raises(InvalidInputError, match="not in the store"):
        store.delete_rows([1003, 99])
    with pytest.raises(InvalidInputError):
        store.delete_rows([[1, 2]])

    other = FeatureStore.open(store.path)
    for reader in (store, other):
        assert reader.deleted_row_ids().tolist() == [1003, 1010, 1011]
        assert reader.deleted_positions().tolist() == [3, 10, 11]
        assert reader.num_live_rows == 47 and reader.num_rows == 50
        live = reader.live_positions()
        assert 3 not in live and 10 not in live and live.tolist() == sorted(set(range(50)) - {3, 10, 11})
        assert not live.flags.writeable
    files = sorted((store.path / "tombstones").iterdir())
    assert len(files) == 2 and all(f.suffix == ".npy" for f in files)
    assert np.load(files[0], allow_pickle=False).dtype == np.int64

    # Another process deleting is seen after a refresh; changed() says when.
    stale = FeatureStore.open(store.path)
    store.delete_rows([1020])
    assert stale.changed() and stale.num_live_rows == 47
    stale.refresh()
    assert not stale.changed() and stale.num_live_rows == 46

    # Appends keep the tombstones.
    store.append(*chunk_data(300, 303))
    assert store.deleted_row_ids().tolist() == [1003, 1010, 1011, 1020]
    assert store.num_live_rows == 49 and store.num_rows == 53
    assert store.row_ids()[store.live_positions()][-3:].tolist() == [1300, 1301, 1302]
    assert np.array_equal(store.row_ids()[:50], ids)

    # A flipped byte in a tombstone file is refused, never read as some other set of rows.
    _flip_byte(files[0])
    with pytest.raises(StoreCorruptedError, match="tombstones"):
        FeatureStore.open(store.path)
    unverified = FeatureStore.open(store.path, verify=False)
    with pytest.raises(StoreCorruptedError, match="tombstones"):
        unverified.live_positions()


def test_incremental_verify_reads_only_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import influence.store.read as module

    store = build(tmp_path / "s")
    known = store.verify()
    assert len(known) == 5  # row ids + 2 layers x (features, norms)
    read: list[Path] = []
    original = module._check_file
    monkeypatch.setattr(module, "_check_file", lambda path, *a: (read.append(path), original(path, *a)))
    assert store.verify(known) == known and read == []
    store.delete_rows([1001])
    again = store.verify(known)
    assert [p.parent.name for p in read] == ["tombstones"] and len(again) == 6


def test_compaction_removes_the_rows_for_good(tmp_path: Path) -> None:
    manifest = make_manifest(dtype="float16")
    store = build(tmp_path / "s", manifest)
    ids, feats = expected(manifest)
    store.save_layer_statistics("embed_tokens", {"M": np.eye(16)})
    build_store_indexes(store, "flat")
    gone = [1000, 1007, 1008, 1049]
    store.delete_rows(gone)
    before = store.layer("embed_tokens")[[0, 7]].tobytes()
    assert store.compact() == 4
    assert store.compact() == 0  # nothing left to do

    reopened = FeatureStore.open(store.path)
    keep = ~np.isin(ids, gone)
    for reader in (store, reopened):
        assert reader.num_rows == reader.num_live_rows == 46 and reader.num_segments == 1
        assert reader.deleted_row_ids().size == 0
        np.testing.assert_array_equal(reader.row_ids(), ids[keep])
        for name, _ in LAYERS:
            np.testing.assert_array_equal(reader.layer(name), feats[name][keep].astype(np.float16))
            np.testing.assert_allclose(
                reader.norms(name), np.linalg.norm(feats[name][keep], axis=1), rtol=1e-6
            )
    # Nothing of the deleted rows is left on disk: old segment, tombstones.
    assert [p.name for p in (store.path / "segments").iterdir()] == ["seg-000001"]
    assert list((store.path / "tombstones").iterdir()) == []
    assert before not in _all_bytes(store.path)
    # Statistics were fitted over the old rows: gone, to be refitted; FAISS indexes must be rebuilt.
    assert not reopened.has_layer_statistics("embed_tokens")
    assert list((store.path / "statistics").iterdir()) == []
    with pytest.raises(StoreIncompleteError):
        reopened.load_layer_statistics("embed_tokens")
    with pytest.raises(ManifestMismatchError, match="rebuild"):
        load_store_indexes(reopened)
    build_store_indexes(reopened, "flat")
    assert load_store_indexes(reopened)["embed_tokens"].ntotal == 46
    # Later appends and compactions keep numbering forward: no name is reused.
    reopened.append(*chunk_data(400, 402))
    reopened.delete_rows([1401])
    assert reopened.compact() == 1
    assert [p.name for p in (store.path / "segments").iterdir()] == ["seg-000003"]


def test_rows_deleted_during_a_compaction_stay_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = build(tmp_path / "s")
    store.delete_rows([1001])
    # Another request, meanwhile.
    _meanwhile(monkeypatch, lambda path: FeatureStore.open(path, verify=False).delete_rows([1002]))
    assert store.compact() == 1
    monkeypatch.undo()
    assert store.num_rows == 49 and store.deleted_row_ids().tolist() == [1002]
    assert 1002 in store.row_ids() and 1002 not in store.row_ids()[store.live_positions()]
    assert store.compact() == 1 and 1002 not in store.row_ids()


def test_compaction_refuses_a_store_appended_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = build(tmp_path / "s")
    store.delete_rows([1001])
    calls = []

    def append_once(path: Path) -> None:
        if not calls:
            calls.append(1)
            FeatureStore.open(path, verify=False).append(*chunk_data(700, 701))

    _meanwhile(monkeypatch, append_once)
    with pytest.raises(StoreIncompleteError, match="compact again"):
        store.compact()
    monkeypatch.undo()
    assert store.num_rows == 51 and store.deleted_row_ids().tolist() == [1001]
    assert store.compact() == 1 and store.num_rows == 50


@pytest.mark.parametrize("dies_at", ["before_switch", "after_switch"])
def test_a_crashed_compaction_leaves_old_or_new_state_and_reruns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: str
) -> None:
    import influence.store.build as module

    store = build(tmp_path / "s")
    store.save_layer_statistics("embed_tokens", {"M": np.eye(16)})
    store.delete_rows([1004, 1005])
    if dies_at == "before_switch":
        # Killed after the new segment was renamed into place, before segments.json named it.
        monkeypatch.setattr(module, "write_json_atomic", _die_on_segments(module.write_json_atomic))
    else:
        # Killed right after the switch: old segments, tombstones and statistics are still on disk.
        monkeypatch.setattr(FeatureStore, "_remove_orphans", _die_after_first(FeatureStore._remove_orphans))
    with pytest.raises(KeyboardInterrupt):
        store.compact()
    monkeypatch.undo()

    after = FeatureStore.open(store.path)  # readable, checksums intact, in one state or the other
    if dies_at == "before_switch":
        assert (
            after.num_rows == 50 and after.num_live_rows == 48 and after.has_layer_statistics("embed_tokens")
        )
        assert len(list((store.path / "segments").iterdir())) == 2  # the orphan
        assert after.compact() == 2
    else:
        assert after.num_rows == 48 and after.deleted_row_ids().size == 0
        assert not after.has_layer_statistics("embed_tokens")  # stale: fitted over the old segment
        assert after.compact() == 0  # cleans up what the crash left
    assert [p.name for p in (store.path / "segments").iterdir()] == ["seg-000001"]
    assert list((store.path / "tombstones").iterdir()) == []
    assert list((store.path / "statistics").iterdir()) == []
    assert 1004 not in after.row_ids() and after.num_rows == 48


def _die_on_segments(original):
    def write(path, obj, tmp_dir):
        if path.name == "segments.json":
            raise KeyboardInterrupt("killed")
        return original(path, obj, tmp_dir)

    return write


def _die_after_first(original):
    calls = []

    def remove(self, referenced):
        calls.append(referenced)
        if len(calls) == 2:  # the first call is the clean-up before writing; the second follows the switch
            raise KeyboardInterrupt("killed")
        return original(self, referenced)

    return remove


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_search_can_exclude_positions(kind: str) -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 8)).astype(np.float32)
    params = {"nlist": 4, "nprobe": 4} if kind == "ivf" else {}
    index = LayerIndex.build(features, kind, **params)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    _, everything = index.search(queries, 10)
    excluded = np.unique(everything[:, :5])
    _, positions = index.search(queries, 10, exclude=excluded)
    assert not np.isin(positions, excluded).any()
    if kind == "flat":  # exact: the best 10 among the rest
        allowed = np.setdiff1d(np.arange(400), excluded)
        truth = np.argsort(-(queries @ features[allowed].T), axis=1)[:, :10]
        np.testing.assert_array_equal(positions, allowed[truth])
    _, same = index.search(queries, 10, exclude=np.zeros(0, dtype=np.int64))
    np.testing.assert_array_equal(same, everything)
