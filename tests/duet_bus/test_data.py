import numpy as np
import pytest

from duet_bus.data import load_dataset, prepare
from duet_bus.data.movielens import bundled_ml100k_dir
from duet_bus.data.prep import PrepConfig
from duet_bus.data.sessions import SessionConfig, session_bounds, session_starts
from duet_bus.errors import ConfigError, DataError


def test_bundled_ml100k_is_found_without_importing_recbole():
    import sys

    folder = bundled_ml100k_dir()
    assert (folder / "ml-100k.inter").is_file()
    assert "recbole" not in sys.modules


def test_bundled_ml100k_loads_with_genres():
    data = load_dataset("ml-100k")
    assert len(data) == 100_000
    assert len(np.unique(data.user)) == 943
    assert data.genres[1] == ("Animation", "Children's", "Comedy")


def test_udata_and_ratings_dat_give_the_same_interactions(tmp_path, udata):
    lines = udata.read_text().splitlines()
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("\n".join("::".join(line.split("\t")) for line in lines) + "\n")
    a, b = load_dataset("ml-100k", udata), load_dataset("ml-1m", ratings)
    assert np.array_equal(a.user, b.user) and np.array_equal(a.item, b.item)
    assert np.array_equal(a.timestamp, b.timestamp)
    assert a.genres[3]  # u.item beside u.data was read


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "u.data"
    bad.write_text("1\t2\t3\t880000000\n1\tx\t3\t880000001\n")
    with pytest.raises(DataError, match=r"u\.data:2: not a number"):
        load_dataset("ml-100k", bad)
    bad.write_text("1\t2\t3\n")
    with pytest.raises(DataError, match=r"u\.data:1: expected 4 fields"):
        load_dataset("ml-100k", bad)


def test_missing_file_and_unbundled_ml1m_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset("ml-100k", tmp_path / "nope.data")
    with pytest.raises(DataError, match="ratings.dat"):
        load_dataset("ml-1m")


def test_prepare_reindexes_sorts_and_splits(tiny):
    assert tiny.items.min() >= 1  # 0 is padding
    for u in range(tiny.n_users):
        times = tiny.times[tiny.offsets[u] : tiny.offsets[u + 1]]
        assert np.all(np.diff(times) >= 0)
    # training targets are positions 1 .. n-3; n-2 is validation, n-1 test
    lengths = tiny.lengths()
    assert len(tiny.train_user) == int((lengths - 3).sum())
    assert np.all(tiny.train_pos < lengths[tiny.train_user] - 2)


def test_eval_negatives_are_unseen_distinct_and_seeded(udata):
    data = load_dataset("ml-100k", udata)
    cfg = PrepConfig(history_len=5, eval_negatives=20)
    a, b, c = prepare(data, cfg, seed=3), prepare(data, cfg, seed=3), prepare(data, cfg, seed=4)
    assert np.array_equal(a.eval_negatives["test"], b.eval_negatives["test"])
    assert not np.array_equal(a.eval_negatives["test"], c.eval_negatives["test"])
    for u in range(a.n_users):
        negs = a.eval_negatives["test"][u]
        assert len(set(negs)) == len(negs)
        assert not set(negs) & set(a.timeline(u))


def test_training_negatives_are_unseen(tiny):
    samples = tiny.train_samples(np.random.default_rng(0), gamma=1.0)
    for row in range(0, len(samples), 7):
        seen = set(tiny.timeline(samples.user[row]))
        assert samples.targets[row, 0] in seen
        assert not set(samples.targets[row, 1:]) & seen


def test_realtime_samples_never_contain_the_target(tiny):
    samples = tiny.train_samples(np.random.default_rng(0), gamma=0.5)
    for row in range(len(samples)):
        u, start = samples.user[row], tiny.train_session_start[row]
        timeline = tiny.timeline(u)
        rt = samples.realtime[row, : samples.realtime_len[row]]
        assert list(rt) == list(timeline[max(0, start - 5) : start])
        assert start <= tiny.train_pos[row]
    assert np.allclose(samples.weight, 0.5 ** samples.position_in_session)
    test = tiny.eval_samples("test")
    for u in range(tiny.n_users):
        timeline = tiny.timeline(u)
        assert list(test.realtime[u, : test.realtime_len[u]]) == list(timeline[-6:-1])
        assert test.targets[u, 0] == timeline[-1]


def test_sessions_by_count_and_gap():
    times = np.array([0, 10, 20, 5000, 5010, 5020, 5030, 9000])
    assert list(session_starts(times, 1, 8, SessionConfig("count", length=3))) == [1, 1, 1, 4, 4, 4, 7]
    gap = SessionConfig("gap", length=3, gap_seconds=100)
    assert session_bounds(times, 0, 8, gap) == [(0, 3), (3, 6), (6, 7), (7, 8)]
    with pytest.raises(ConfigError, match="sessions.mode"):
        SessionConfig("weekly")


def test_the_dense_seen_table_answers_as_the_binary_search(tiny, monkeypatch):
    from duet_bus.data import prep as prep_module

    rng = np.random.default_rng(0)
    keys = rng.integers(0, tiny.n_users * (tiny.n_items + 1), 5000)
    keys[:50] = tiny.seen_keys[:50]  # some certainly seen
    table = tiny._seen(keys)
    monkeypatch.setattr(prep_module, "SEEN_TABLE_MAX", 0)
    np.testing.assert_array_equal(table, tiny._seen(keys))
    assert table[:50].all() and not table.all()
