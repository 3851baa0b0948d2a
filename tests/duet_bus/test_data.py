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


# -- a click log of one's own: the csv dataset ------------------------------------------------------------


def _csv_of(udata, path, genres=None):
    """``udata`` as a CSV click log, columns shuffled and one extra (rating) the reader ignores."""
    rows = ["timestamp,rating,item,user" + (",genres" if genres else "")]
    for line in udata.read_text().splitlines():
        user, item, rating, t = line.split("\t")
        rows.append(f"{t},{rating},{item},{user}" + (f",{genres.get(int(item), '')}" if genres else ""))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_csv_click_log_gives_the_interactions_of_the_same_data(tmp_path, udata):
    """The same events as u.data, as a CSV log: the same interactions, so the same prepared data, splits and
    negatives; genres from its genres column."""
    a = load_dataset("ml-100k", udata)
    b = load_dataset("csv", _csv_of(udata, tmp_path / "clicks.csv", {3: "Drama|Comedy", 4: ""}))
    assert b.name == "csv" and b.source == "clicks.csv"
    for field in ("user", "item", "timestamp"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert b.genres == {3: ("Drama", "Comedy")}
    config = PrepConfig(history_len=5, eval_negatives=20)
    pa, pb = prepare(a, config, seed=1), prepare(b, config, seed=1)
    assert np.array_equal(pa.items, pb.items) and np.array_equal(pa.eval_negatives["test"], pb.eval_negatives["test"])


def test_a_csv_click_log_with_names_dates_and_short_users(tmp_path):
    """Ids that are not integers are numbered in order of first appearance; ISO 8601 times (UTC without a zone)
    and decimal seconds are read; users with fewer than 3 events are left out, and the source says how many."""
    log = tmp_path / "log.csv"
    log.write_text("user,item,timestamp\n"
                   "alice,sku-9,2024-05-01T12:00:00\n"
                   "alice,sku-2,2024-05-01T12:00:30+00:00\n"
                   "bob,sku-2,1714564800.5\n"
                   "alice,sku-9,1714564900\n"
                   "\n"
                   "bob,sku-3,1714564801\n")
    data = load_dataset("csv", log)
    assert data.user.tolist() == [1, 1, 1]  # alice; bob has 2 events
    assert data.item.tolist() == [1, 2, 1]  # sku-9, sku-2 (bob's sku-3 left out with him)
    assert data.timestamp.tolist() == [1714564800, 1714564830, 1714564900]
    assert data.source == "log.csv (1 of 2 users, with fewer than 3 interactions, left out)"


@pytest.mark.parametrize("text, message", [
    ("", r"log\.csv: empty file; expected a header line naming user, item, timestamp"),
    ("user,item,time\n1,2,3\n", r"log\.csv: the header names no timestamp column \(it has 'user', 'item', 'time'"),
    ("user,item,timestamp\n", r"log\.csv: no interactions after the header"),
    ("user,item,timestamp\n1,2,3\n1,2,yesterday\n", r"log\.csv:3: timestamp 'yesterday' is neither seconds nor"),
    ("user,item,timestamp\n1,2,3\n1,,4\n", r"log\.csv:3: no item"),
    ("user,item,timestamp\n1,2,3\n1,2\n", r"log\.csv:3: 2 fields, the header names 3"),
    ("user,item,timestamp\n1,2,inf\n", r"log\.csv:2: timestamp 'inf' is neither"),
    ("user,item,timestamp\n1,2,3\n2,2,3\n", r"log\.csv: no user has 3 interactions"),
])
def test_a_bad_csv_click_log_names_the_file_line_and_what_is_wrong(tmp_path, text, message):
    log = tmp_path / "log.csv"
    log.write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset("csv", log)


def test_a_csv_click_log_that_is_not_text_or_not_given(tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(b"user,item,timestamp\n1,2,\xff\xfe\n")
    with pytest.raises(DataError, match=r"log\.csv: not UTF-8 text"):
        load_dataset("csv", log)
    with pytest.raises(DataError, match="dataset csv: give the path of the CSV file"):
        load_dataset("csv")
    with pytest.raises(DataError, match="no such file"):
        load_dataset("csv", tmp_path / "missing.csv")
    with pytest.raises(DataError, match="a folder, not a CSV file"):
        load_dataset("csv", tmp_path)
