"""The memory-bank index: exact search order, ScaNN recall, save/load, bad input, and the sharded index across two
processes against one index."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cm3jax.retrieval.index import ExactIndex, IndexOptions, ScannIndex, build_index, load_index, top_k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clustered_bank(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def reference_search(bank, queries, k):
    scores = queries.astype(np.float64) @ bank.T.astype(np.float64)
    ids = np.broadcast_to(np.arange(len(bank)), scores.shape)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return order


def test_exact_search_orders_by_score_then_id_and_keeps_every_tie(monkeypatch):
    bank = clustered_bank(3000, 16, 20, seed=0)
    bank[100:110] = bank[5]  # exact duplicates: ten ties with row 5
    queries = np.concatenate([bank[5:6], clustered_bank(20, 16, 20, seed=1)])
    monkeypatch.setattr(ExactIndex, "BLOCK", 512)  # ties and the k-th place fall across blocks
    scores, ids = ExactIndex(bank).search(queries, 8)
    np.testing.assert_array_equal(ids, reference_search(bank, queries, 8))
    assert list(ids[0]) == [5, 100, 101, 102, 103, 104, 105, 106]
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_a_querys_results_do_not_depend_on_the_queries_searched_with_it(kind):
    """Near-ties everywhere: float32 products of one query and of a batch round differently, so results taken from
    them would reorder; every batching must give the same scores and ids."""
    rng = np.random.default_rng(4)
    centres = clustered_bank(40, 64, 40, seed=5)
    bank = centres[rng.integers(0, 40, 4000)] + 3e-7 * rng.normal(size=(4000, 64)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = centres[rng.integers(0, 40, 64)] + 0.05 * rng.normal(size=(64, 64)).astype(np.float32)
    index = build_index(bank, IndexOptions(kind=kind, num_leaves=20, leaves_to_search=20, reorder=400))
    together = index.search(queries, 30)
    for batch in (1, 7, 25):
        parts = [index.search(queries[i:i + batch], 30) for i in range(0, len(queries), batch)]
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), together[1])
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), together[0])


def test_scann_builds_of_one_bank_are_the_same_index():
    bank = clustered_bank(320, 16, 10, seed=6)  # partitions smaller than ScaNN's default minimum size
    first, second = (build_index(bank, IndexOptions(kind="scann")) for _ in range(2))
    np.testing.assert_array_equal(first.search(bank[:50], 20)[1], second.search(bank[:50], 20)[1])


def test_top_k_pads_short_candidate_lists():
    scores, ids = top_k(np.array([[0.5, 0.9]], np.float32), np.array([[7, 3]]), 3)
    assert list(ids[0]) == [3, 7, -1] and scores[0, 2] == -np.inf


def test_scann_recall_against_exact_on_a_clustered_bank():
    bank = clustered_bank(30_000, 64, 200, seed=2)
    queries = clustered_bank(200, 64, 200, seed=3)
    index = build_index(bank, IndexOptions(exact_below=10_000, leaves_to_search=43))  # a quarter of the leaves
    assert isinstance(index, ScannIndex) and index.params["num_leaves"] == 173
    _, found = index.search(queries, 10)
    _, truth = ExactIndex(bank).search(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_save_and_load_give_identical_results(tmp_path, kind):
    bank = clustered_bank(2000, 32, 30, seed=4)
    queries = clustered_bank(50, 32, 30, seed=5)
    ids = np.arange(2000) + 10_000  # global ids of a shard
    index = build_index(bank, IndexOptions(kind=kind, num_leaves=40), ids=ids)
    index.save(str(tmp_path / "index"))
    loaded = load_index(str(tmp_path / "index"))
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    assert index.search(queries, 5)[1].min() >= 10_000


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="empty"):
        build_index(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="index_kind"):
        IndexOptions(kind="faiss")
    with pytest.raises(FileNotFoundError, match="cm3jax retrieve"):
        load_index(str(tmp_path))


WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    sys.path.insert(0, sys.argv[4])
    from test_retrieval_index import clustered_bank
    from cm3jax.retrieval.index import ExactIndex, ShardedIndex
    bank = clustered_bank(5000, 16, 40, seed=6)
    bank[4000:4005] = bank[10]  # ties that straddle the two shards
    queries = np.concatenate([bank[10:11], clustered_bank(61, 16, 40, seed=7)])
    mine = slice(0, 2600) if process == 0 else slice(2600, 5000)
    local = ExactIndex(bank[mine], ids=np.arange(5000)[mine])
    half = queries[:31] if process == 0 else queries[31:62]
    scores, ids = ShardedIndex(local).search(half, 7)
    np.save(out, ids)
""")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_exact_index_over_two_processes_equals_one_index(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(tmp_path / f"ids{i}.npy"),
                               os.path.join(REPO, "tests")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 0, out[-3000:]
    sharded = np.concatenate([np.load(tmp_path / "ids0.npy"), np.load(tmp_path / "ids1.npy")])
    bank = clustered_bank(5000, 16, 40, seed=6)
    bank[4000:4005] = bank[10]
    queries = np.concatenate([bank[10:11], clustered_bank(61, 16, 40, seed=7)])
    _, single = ExactIndex(bank).search(queries, 7)
    np.testing.assert_array_equal(sharded, single)
    assert list(sharded[0][:6]) == [10, 4000, 4001, 4002, 4003, 4004]
