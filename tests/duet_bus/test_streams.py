"""Device streams for the runner: held-out data only, the device's own click log, seeded shifts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duet_bus.data import load_dataset, prep, prepare
from duet_bus.data.prep import PrepConfig
from duet_bus.data.streams import DeviceStream, heldout_sessions, log_window_run, log_windows
from duet_bus.errors import ConfigError
from duet_bus.shifts import SHIFTS


@pytest.fixture
def held(udata):
    return prepare(load_dataset("ml-100k", udata), PrepConfig(history_len=5, eval_negatives=20, holdout=0.4), seed=0)


def test_holdout_keeps_the_recent_part_out_of_training_and_evaluation(held):
    lengths, known = held.lengths(), held.known
    assert (known < lengths).all() and (known >= 3).all()
    # Training positions, validation and test targets all lie in the known part.
    assert (held.train_pos < known[held.train_user] - 2).all()
    test = held.eval_samples("test")
    assert (test.targets[:, 0] == [held.timeline(u)[known[u] - 1] for u in range(held.n_users)]).all()
    streamed = heldout_sessions(held, 0)
    assert sum(len(s.items) for s in streamed) == lengths[0] - known[0]
    assert np.array_equal(np.concatenate([s.items for s in streamed]), held.timeline(0)[known[0]:])


def test_a_session_scores_each_click_given_only_what_came_before(held):
    device = DeviceStream(0, held, 0, negatives=20)
    log_before = device.log.copy()
    session = device.next_session(np.random.default_rng(0), recent=4)
    items = heldout_sessions(held, 0)[0].items
    assert np.array_equal(session.realtime, log_before[-5:])  # the clicks before the session, not its targets
    assert np.array_equal(session.samples.targets[:, 0], items)
    assert session.samples.labels[:, 0].all() and not session.samples.labels[:, 1:].any()
    second = session.samples.history[1, : session.samples.history_len[1]]
    assert np.array_equal(second, np.concatenate([log_before, items[:1]])[-5:])
    assert len(session.recent) == 4 and np.array_equal(session.recent.targets[:, 0], log_before[-4:])
    assert np.array_equal(device.log[len(log_before):], items)


def test_handover_streams_another_user_and_keeps_the_device_log(held):
    device = DeviceStream(0, held, 0, negatives=20)
    log = device.log.copy()
    SHIFTS["handover"](held, {}).apply(device, np.random.default_rng(1))
    assert device.user != 0 and device.home_user == 0
    session = device.next_session(np.random.default_rng(0))
    assert np.array_equal(session.realtime, log[-5:])  # the old owner's clicks, until the new owner's replace them
    assert np.array_equal(session.samples.targets[:, 0], heldout_sessions(held, device.user)[0].items)


def test_interest_drift_moves_clicks_to_the_target_genre(held):
    genre = held.genres[1][0]
    device = DeviceStream(0, held, 0, negatives=20)
    SHIFTS["interest_drift"](held, {"strength": 1.0, "genres": [genre]}).apply(device, np.random.default_rng(0))
    session = device.next_session(np.random.default_rng(0))
    clicked = session.samples.targets[:, 0]
    assert all(genre in held.genres[int(i)] for i in clicked)
    assert not (session.samples.targets[:, 1:] == clicked[:, None]).any()  # a drifted click is never its own negative


def test_the_example_plugin_shift_taps_random_items(held):
    """`examples/accidental_taps.py`: at rate 1 every click of the next session is a random item, drawn from the
    device's own generator (the same taps for the same draws); invalid rates are refused by name."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("accidental_taps",
                                                  Path(__file__).parents[2] / "examples" / "accidental_taps.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        taps = SHIFTS["accidental_taps"]
        assert taps.check("rate", 0) == taps.check("rate", True) == "must be a number in (0, 1]"
        plain, tapped, again = (DeviceStream(0, held, 0, negatives=20) for _ in range(3))
        for device in (tapped, again):
            taps(held, {"rate": 1.0}).apply(device, np.random.default_rng(0))
        sessions = [d.next_session(np.random.default_rng(1)).samples.targets[:, 0] for d in (plain, tapped, again)]
        assert not np.array_equal(sessions[0], sessions[1]) and np.array_equal(sessions[1], sessions[2])
        assert ((sessions[1] >= 1) & (sessions[1] <= held.n_items)).all()
    finally:
        SHIFTS.pop("accidental_taps", None)


def test_drift_to_an_unknown_genre_is_a_config_error(held):
    with pytest.raises(ConfigError, match="'Space Opera' is not a genre"):
        SHIFTS["interest_drift"](held, {"strength": 0.5, "genres": ["Space Opera"]})


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.integers(0, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_a_run_of_windows_is_what_log_windows_gives_each_index(size, count, length, seed):
    log = np.random.default_rng(seed).integers(1, 1000, size + count).astype(np.int32)
    start = min(size, len(log))
    stop = start + count
    rows, lengths = log_window_run(log, start, stop, length)
    want_rows, want_lengths = log_windows(log, np.arange(start, stop), length)
    assert rows.dtype == want_rows.dtype == np.int64 and rows.shape == want_rows.shape
    assert np.array_equal(rows, want_rows) and np.array_equal(lengths, want_lengths)


@pytest.mark.parametrize("dense", [True, False], ids=["seen table", "seen keys"])
def test_one_users_negatives_are_the_draws_and_items_of_sample_negatives(held, monkeypatch, dense):
    if not dense:  # the path of a data set too large for the dense user x item table
        monkeypatch.setattr(prep, "SEEN_TABLE_MAX", 0)
    for user in range(0, held.n_users, 7):
        for rows, k in ((5, 20), (1, 1), (10, 4), (0, 3)):
            ours, theirs = np.random.default_rng(user), np.random.default_rng(user)
            got = held.negatives_for(ours, user, rows, k)
            want = held.sample_negatives(theirs, np.full(rows, user), k)
            assert np.array_equal(got, want) and got.dtype == want.dtype
            assert ours.bit_generator.state == theirs.bit_generator.state  # the same draws, no more, no fewer
            assert not held._seen(user * (held.n_items + 1) + got).any()
