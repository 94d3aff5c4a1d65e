"""Feature store: real files under tmp_path, real processes for concurrency, crashes simulated by failing
renames at the exact step a killed process would stop."""

from __future__ import annotations

import inspect
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from influence.errors import (
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
    UnknownLayerError,
)
from influence.store import FeatureStore, LayerSpec, StoreManifest, StoreReader, layer_file_stem

LAYERS = (("block.3.attn.v.lora_B", 24), ("embed_tokens", 16))


def make_manifest(**overrides) -> StoreManifest:
    fields = {
        "model_id": "tiny-roberta",
        "revision": "abc123",
        "weights_hash": "w" * 8,
        "tokenizer": "tok-1",
        "dataset_hash": "d" * 8,
        "layers": [LayerSpec(name, dim, dim * 10) for name, dim in LAYERS],
        "projection": {"kind": "gaussian", "dim": 24, "seed": 7},
        "dtype": "float32",
        "library_version": "0.1.0",
        "num_rows": 50,
        "chunk_size": 8,
        "task": "classification",
        "max_length": 128,
        "checkpoints": [{"name": "epoch-2", "learning_rate": 3e-4}],
        "extra": {"note": "test"},
    }
    fields.update(overrides)
    return StoreManifest(**fields)


def chunk_data(start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Deterministic rows [start, stop): any process regenerates the same values; row id = 1000 + position."""
    rng = np.random.default_rng(start)
    features = {name: rng.normal(scale=3.0, size=(stop - start, dim)) for name, dim in LAYERS}
    return np.arange(1000 + start, 1000 + stop, dtype=np.int64), features


def expected(manifest: StoreManifest) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids, feats = zip(*(chunk_data(a, b) for a, b in _ranges(manifest)), strict=True)
    return np.concatenate(ids), {name: np.concatenate([f[name] for f in feats]) for name, _ in LAYERS}


def _ranges(manifest: StoreManifest) -> list[tuple[int, int]]:
    return [
        (s, min(s + manifest.chunk_size, manifest.num_rows))
        for s in range(0, manifest.num_rows, manifest.chunk_size)
    ]


def write_chunks(store: FeatureStore, indices) -> None:
    ranges = store.chunk_ranges()
    for index in indices:
        store.write_chunk(index, *chunk_data(*ranges[index]))


def build(path: Path, manifest: StoreManifest | None = None) -> FeatureStore:
    store = FeatureStore.create(path, manifest or make_manifest())
    write_chunks(store, range(store.num_chunks))
    store.finalize()
    return store


def segment_files(store: FeatureStore) -> dict[str, bytes]:
    root = store.path / "segments"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_feature_store_provides_the_reader_protocol() -> None:
    members = [name for name in vars(StoreReader) if not name.startswith("_")]
    assert {"layer", "norms", "row_ids", "live_positions", "iter_layer_chunks", "manifest"} <= set(members)
    for name in members:
        declared, provided = vars(StoreReader)[name], inspect.getattr_static(FeatureStore, name)
        assert isinstance(provided, property) == isinstance(declared, property), name
        if not isinstance(declared, property):
            wanted = inspect.signature(declared).parameters.keys()
            assert inspect.signature(provided).parameters.keys() == wanted, name


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_json_round_trip_and_fingerprint() -> None:
    manifest = make_manifest()
    again = StoreManifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.fingerprint() == manifest.fingerprint()
    # num_rows and extra are not part of what a query must match; everything else is.
    assert make_manifest(num_rows=999, extra={"x": 1}).fingerprint() == manifest.fingerprint()
    for change in (
        {"projection": {"kind": "gaussian", "dim": 24, "seed": 8}},
        {"dtype": "float16"},
        {"revision": "other"},
        {"checkpoints": []},
        {"chunk_size": 9},
    ):
        assert make_manifest(**change).fingerprint() != manifest.fingerprint(), change
    with pytest.raises(InvalidInputError, match="unknown manifest fields"):
        StoreManifest.from_dict({**manifest.to_dict(), "surprise": 1})
    with pytest.raises(InvalidInputError, match="dtype"):
        make_manifest(dtype="bfloat16")
    with pytest.raises(InvalidInputError, match="duplicate layer"):
        make_manifest(layers=[LayerSpec("a", 2, 2), LayerSpec("a", 2, 2)])


def test_check_compatible_names_differing_fields() -> None:
    manifest = make_manifest()
    manifest.check_compatible(make_manifest(num_rows=3))
    manifest.check_compatible(
        {"weights_hash": "w" * 8, "layers": [{"name": n, "dim": d, "num_params": d * 10} for n, d in LAYERS]}
    )
    with pytest.raises(ManifestMismatchError) as info:
        manifest.check_compatible(
            {"weights_hash": "zzz", "projection": {"kind": "gaussian", "dim": 24, "seed": 1}}
        )
    assert "weights_hash" in str(info.value) and "projection" in str(info.value)
    assert "revision" not in str(info.value)
    with pytest.raises(ManifestMismatchError, match="tokenizer"):
        manifest.check_compatible(make_manifest(tokenizer="tok-2"))
    with pytest.raises(InvalidInputError, match="num_rows"):
        manifest.check_compatible({"num_rows": 50})


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_out_of_order(tmp_path: Path, dtype: str) -> None:
    manifest = make_manifest(dtype=dtype)
    store = FeatureStore.create(tmp_path / "s", manifest)
    assert store.chunk_ranges() == _ranges(manifest) and store.num_chunks == 7
    order = [5, 0, 6, 2, 3, 1, 4]
    write_chunks(store, order[:4])
    assert store.pending_chunks() == [1, 3, 4]
    write_chunks(store, order[4:])
    assert store.pending_chunks() == [] and not store.is_complete
    store.finalize()
    assert store.is_complete

    store = FeatureStore.open(tmp_path / "s")
    ids, feats = expected(manifest)
    assert store.layers == [name for name, _ in LAYERS]
    assert store.num_rows == 50
    np.testing.assert_array_equal(store.row_ids(), ids)
    for name, _ in LAYERS:
        layer = store.layer(name)
        assert isinstance(layer, np.memmap) and not layer.flags.writeable and layer.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(layer, feats[name].astype(np.float32).astype(dtype))
        values32 = feats[name].astype(np.float32)
        reference = np.linalg.norm(values32.astype(np.float64), axis=1)
        norms = store.norms(name)
        assert norms.dtype == np.float32
        np.testing.assert_allclose(norms, reference, rtol=1e-6)
        if dtype == "float16":
            # The norms must come from the float32 values: those of the float16 copy are measurably off.
            from_half = np.linalg.norm(values32.astype(np.float16).astype(np.float64), axis=1)
            assert np.abs(from_half - reference).max() > 1e-4 * reference.max()
        parts = list(store.iter_layer_chunks(name, 20))
        assert [start for start, _ in parts] == [0, 20, 40]
        np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), layer)
    with pytest.raises(UnknownLayerError):
        store.layer("block.3.attn.q.lora_B")
    with pytest.raises(UnknownLayerError):
        store.norms("nope")


def test_write_chunk_validates_input(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", make_manifest(dtype="float16"))
    ids, feats = chunk_data(0, 8)
    bad_cases = [
        (ids[:7], feats, "rows"),
        (ids.astype(np.float64), feats, "integer"),
        (np.array([1000] * 8), feats, "duplicates"),
        (ids, {**feats, "embed_tokens": feats["embed_tokens"][:, :15]}, "shape"),
        (ids, {**feats, "embed_tokens": np.ones((8, 16), dtype=np.int32)}, "float"),
        (ids, {"embed_tokens": feats["embed_tokens"]}, "lack"),
        (ids, {**feats, "embed_tokens": np.full((8, 16), np.nan)}, "NaN"),
        (ids, {**feats, "embed_tokens": np.full((8, 16), 1e5)}, "overflow"),
    ]
    for row_ids, features, message in bad_cases:
        with pytest.raises(InvalidInputError, match=message):
            store.write_chunk(0, row_ids, features)
    with pytest.raises(UnknownLayerError):
        store.write_chunk(0, ids, {**feats, "lm_head": feats["embed_tokens"]})
    with pytest.raises(InvalidInputError, match="out of range"):
        store.write_chunk(7, ids, feats)
    assert store.pending_chunks() == list(range(7))


def test_reads_refused_until_finalized(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", make_manifest())
    write_chunks(store, [0, 1, 2])
    for read in (
        lambda: store.num_rows,
        store.row_ids,
        lambda: store.layer("embed_tokens"),
        lambda: store.norms("embed_tokens"),
        lambda: next(store.iter_layer_chunks("embed_tokens", 4)),
    ):
        with pytest.raises(StoreIncompleteError):
            read()
    with pytest.raises(StoreIncompleteError, match=r"\[3, 4, 5, 6\]"):
        store.finalize()
    with pytest.raises(StoreIncompleteError):
        store.append(*chunk_data(100, 102))
    write_chunks(store, range(3, 7))
    with pytest.raises(StoreIncompleteError, match="finalize"):
        store.layer("embed_tokens")


# ---------------------------------------------------------------------------------------------- concurrency


def _write_chunks_in_process(path: str, indices: list[int], barrier) -> None:
    store = FeatureStore.open(path, verify=False)
    barrier.wait(timeout=30)
    write_chunks(store, indices)


def _append_in_process(path: str, first_row: int, barrier) -> None:
    store = FeatureStore.open(path, verify=False)
    barrier.wait(timeout=30)
    for k in range(3):
        start = first_row + 10 * k
        ids, feats = chunk_data(start, start + 10)
        store.append(ids, feats)


def _run_processes(target, args_list) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args_list))
    # daemon: a hung child is killed with the test run instead of blocking it.
    processes = [context.Process(target=target, args=(*args, barrier), daemon=True) for args in args_list]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_two_processes_write_chunks_concurrently(tmp_path: Path) -> None:
    manifest = make_manifest()
    store = FeatureStore.create(tmp_path / "s", manifest)
    # Both processes also write chunks 1 and 2: concurrent rewrites of one chunk must stay harmless.
    _run_processes(
        _write_chunks_in_process, [(str(store.path), [0, 1, 2, 4, 6]), (str(store.path), [2, 1, 3, 5])]
    )
    assert store.pending_chunks() == []
    store.finalize()
    ids, feats = expected(manifest)
    np.testing.assert_array_equal(store.row_ids(), ids)
    for name, _ in LAYERS:
        np.testing.assert_array_equal(store.layer(name), feats[name].astype(np.float32))
    assert list((store.path / "tmp").iterdir()) == []


def test_two_processes_append_concurrently(tmp_path: Path) -> None:
    store = build(tmp_path / "s")
    _run_processes(_append_in_process, [(str(store.path), 100), (str(store.path), 200)])
    store = FeatureStore.open(store.path)
    assert store.num_rows == 50 + 60 and store.num_segments == 7
    ids = store.row_ids()
    assert sorted(ids[50:].tolist()) == sorted(1000 + np.r_[100:130, 200:230])
    # Each appended segment holds exactly the rows one append call wrote, whatever the interleaving.
    for name, _ in LAYERS:
        layer = store.layer(name)
        for start in range(50, 110, 10):
            first = int(ids[start]) - 1000
            _, feats = chunk_data(first, first + 10)
            np.testing.assert_array_equal(layer[start : start + 10], feats[name].astype(np.float32))


# ---------------------------------------------------------------------------------------------- crashes


def test_resume_after_crash_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = make_manifest(dtype="float16")
    reference = build(tmp_path / "ref", manifest)

    store = FeatureStore.create(tmp_path / "s", manifest)
    write_chunks(store, [0, 1, 2, 4, 5, 6])

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    # A writer killed between writing its temp file and renaming it leaves the temp file and no chunk.
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated crash"):
            write_chunks(store, [3])
    leftover = tmp_path / "s" / "tmp" / "seg-000000.0123.partial"
    leftover.mkdir()
    (leftover / "embed_tokens-half.npy").write_bytes(b"\x93NUMPY half-written")
    assert len(list((tmp_path / "s" / "tmp").iterdir())) == 2

    resumed = FeatureStore.create(tmp_path / "s", manifest)  # a new worker resumes the job
    assert resumed.pending_chunks() == [3]
    assert not resumed.is_complete
    write_chunks(resumed, resumed.pending_chunks())
    resumed.finalize()
    assert segment_files(resumed) == segment_files(reference)
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert not (tmp_path / "s" / "chunks").exists()


def test_finalize_crash_leaves_old_or_new_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = make_manifest()
    store = FeatureStore.create(tmp_path / "s", manifest)
    write_chunks(store, range(7))
    real_replace = os.replace

    def crash_on_segments_list(src, dst, *args, **kwargs):
        if Path(dst).name == "segments.json":
            raise OSError("simulated crash")
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_on_segments_list)
        with pytest.raises(OSError, match="simulated crash"):
            store.finalize()
    # Crashed before the switch: still the build state, nothing served, every chunk kept.
    reopened = FeatureStore.open(tmp_path / "s")
    assert not reopened.is_complete and reopened.pending_chunks() == []
    with pytest.raises(StoreIncompleteError):
        reopened.layer("embed_tokens")

    real_rmtree = shutil.rmtree

    def crash_on_chunks(path, *args, **kwargs):
        if Path(path).name == "chunks":
            raise OSError("simulated crash")
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", crash_on_chunks)
        with pytest.raises(OSError, match="simulated crash"):
            reopened.finalize()
    # Crashed after the switch, before cleanup: the new state, fully readable.
    store = FeatureStore.open(tmp_path / "s")
    assert store.is_complete and (tmp_path / "s" / "chunks").exists()
    ids, feats = expected(manifest)
    np.testing.assert_array_equal(store.row_ids(), ids)
    np.testing.assert_array_equal(store.layer("embed_tokens"), feats["embed_tokens"].astype(np.float32))
    store.finalize()
    assert not (tmp_path / "s" / "chunks").exists()
    assert [p.name for p in (tmp_path / "s" / "segments").iterdir()] == ["seg-000000"]


def test_finalize_twice_is_a_no_op(tmp_path: Path) -> None:
    store = build(tmp_path / "s")
    before = segment_files(store)
    stat = (store.path / "segments.json").stat()
    store.finalize()
    FeatureStore.open(store.path).finalize()
    FeatureStore.create(store.path, make_manifest())  # a retried build job reopens the finished store
    assert segment_files(store) == before
    assert not (store.path / "chunks").exists()
    after = (store.path / "segments.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # A retried chunk task after finalize writes nothing.
    assert store.write_chunk(0, *chunk_data(0, 8)) is False
    assert store.pending_chunks() == []


# ---------------------------------------------------------------------------------------------- append


def test_append_then_read(tmp_path: Path) -> None:
    manifest = make_manifest(dtype="float16")
    store = build(tmp_path / "s", manifest)
    new_ids, new_feats = chunk_data(300, 305)
    assert store.append(new_ids, new_feats) == 5
    assert store.append(np.zeros(0, dtype=np.int64), {n: np.zeros((0, d)) for n, d in LAYERS}) == 0

    store = FeatureStore.open(store.path)
    ids, feats = expected(manifest)
    assert store.num_rows == 55 and store.num_segments == 2
    np.testing.assert_array_equal(store.row_ids(), np.concatenate([ids, new_ids]))
    for name, _ in LAYERS:
        whole = np.concatenate([feats[name], new_feats[name]]).astype(np.float32)
        np.testing.assert_array_equal(store.layer(name), whole.astype(np.float16))
        np.testing.assert_allclose(store.norms(name), np.linalg.norm(whole, axis=1), rtol=1e-6)
        starts = [start for start, _ in store.iter_layer_chunks(name, 32)]
        assert starts == [0, 32, 50]  # chunks stop at the segment boundary
    with pytest.raises(InvalidInputError, match="already in the store"):
        store.append(*chunk_data(0, 2))
    assert store.num_rows == 55


# ---------------------------------------------------------------------------------------------- integrity


def _flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_detected_on_open(tmp_path: Path) -> None:
    store = build(tmp_path / "s")
    target = store.path / "segments" / "seg-000000" / f"{layer_file_stem('embed_tokens')}.npy"
    _flip_byte(target)
    with pytest.raises(StoreCorruptedError, match=target.name):
        FeatureStore.open(store.path)
    unverified = FeatureStore.open(store.path, verify=False)
    with pytest.raises(StoreCorruptedError, match=target.name):
        unverified.verify()
    _flip_byte(target)  # restored
    FeatureStore.open(store.path)

    manifest_path = store.path / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"seed": 7', '"seed": 8'))
    with pytest.raises(StoreCorruptedError):
        FeatureStore.open(store.path)


def test_flipped_byte_in_chunk_refused_by_finalize(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", make_manifest())
    write_chunks(store, range(7))
    # Inside the row_ids member's data (the first member of the archive), so its zip CRC-32 must catch it.
    _flip_byte(store.path / "chunks" / "chunk-000004.npz", offset=200)
    with pytest.raises(StoreCorruptedError, match="chunk-000004"):
        store.finalize()
    assert not store.is_complete


def test_statistics_round_trip_atomic_and_checksummed(tmp_path: Path) -> None:
    store = build(tmp_path / "s")
    matrix = np.random.default_rng(1).normal(size=(24, 24)).astype(np.float32)
    name = "block.3.attn.v.lora_B"
    assert not store.has_layer_statistics(name)
    with pytest.raises(StoreIncompleteError):
        store.load_layer_statistics(name)
    store.save_layer_statistics(name, {"M": matrix, "lambda": np.array([0.5])})
    store.save_layer_statistics(name, {"M": matrix * 2, "lambda": np.float64(0.25), "n": np.array([50])})
    loaded = FeatureStore.open(store.path).load_layer_statistics(name)
    np.testing.assert_array_equal(loaded["M"], matrix * 2)
    assert loaded["lambda"].shape == () and loaded["lambda"].dtype == np.float64 and loaded["lambda"] == 0.25
    assert loaded["n"].shape == (1,) and loaded["n"].dtype == np.int64
    files = list((store.path / "statistics").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # the replaced file is gone
    with pytest.raises(UnknownLayerError):
        store.save_layer_statistics("lm_head", {"M": matrix})
    _flip_byte(files[0])
    with pytest.raises(StoreCorruptedError, match="statistics"):
        store.load_layer_statistics(name)
    with pytest.raises(StoreCorruptedError, match="statistics"):
        FeatureStore.open(store.path)


def test_no_pickle_anywhere(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", make_manifest(dtype="float16"))
    write_chunks(store, range(7))
    with np.load(store.path / "chunks" / "chunk-000000.npz", allow_pickle=False) as archive:
        assert archive["row_ids"].dtype == np.int64
    store.finalize()
    store.append(*chunk_data(500, 503))
    store.save_layer_statistics("embed_tokens", {"M": np.eye(16)})
    suffixes = {p.suffix for p in store.path.rglob("*") if p.is_file()}
    assert suffixes <= {".npy", ".json", ".safetensors", ".lock"}, suffixes
    for path in store.path.rglob("*.npy"):
        array = np.load(path, allow_pickle=False)
        assert array.dtype != object


# ---------------------------------------------------------------------------------------------- create


def test_create_is_idempotent_and_refuses_mismatch(tmp_path: Path) -> None:
    manifest = make_manifest()
    store = FeatureStore.create(tmp_path / "s", manifest)
    write_chunks(store, [0, 3])
    again = FeatureStore.create(tmp_path / "s", make_manifest(extra={"retry": 2}))
    assert again.pending_chunks() == [1, 2, 4, 5, 6]
    assert again.manifest.extra == {"note": "test"}  # the stored manifest stays authoritative
    with pytest.raises(ManifestMismatchError, match="projection"):
        FeatureStore.create(
            tmp_path / "s", make_manifest(projection={"kind": "gaussian", "dim": 24, "seed": 8})
        )
    with pytest.raises(ManifestMismatchError, match="num_rows"):
        FeatureStore.create(tmp_path / "s", make_manifest(num_rows=51))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(InvalidInputError, match="not a feature store"):
        FeatureStore.create(tmp_path / "other", manifest)
    with pytest.raises(InvalidInputError, match="not a feature store"):
        FeatureStore.open(tmp_path / "missing")


def test_layer_file_names_are_safe_and_distinct() -> None:
    names = ["block.3.attn.v.lora_B", "block_3_attn_v_lora_B", "../../etc/passwd", ".hidden", "a/b"]
    stems = [layer_file_stem(n) for n in names]
    assert len(set(stems)) == len(names)
    for stem in stems:
        assert "/" not in stem and "." not in stem and not stem.startswith("-")
