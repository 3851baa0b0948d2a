"""In-process shards hand their records to the parent through files: what a bad file does."""

import asyncio

import pytest

from duet_bus import protocol
from duet_bus.errors import DuetError
from duet_bus.protocol import ShardRecords
from duet_bus.shards import _memory_sharded, read_records, write_records


def parts(run_id="r1", shard=1, count=2, n=3):
    rows = [{"session_id": f"s{i}", "auc": 0.5 + i / 100} for i in range(n * 2)]
    return [ShardRecords(run_id=run_id, shard=shard, shards=count, part=k, rows=rows[2 * k: 2 * k + 2],
                         done=k == n - 1, run={"sessions": n * 2} if k == n - 1 else {})
            for k in range(n)]


def test_records_come_back_as_written(tmp_path):
    path = tmp_path / "shard-1.records"
    write_records(path, parts())
    assert read_records(path, "r1", 1, 2) == parts()
    assert [p.name for p in tmp_path.iterdir()] == ["shard-1.records"]  # the temporary name is gone


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-5], "cut short in part 2"),
    (lambda data: data + b"\x00\x00\x00\x03abc", "part 3 is not a shard's records"),
    (lambda data: b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1" + data, "part 0 is not a shard's records"),
    (lambda data: data[:3], "cut short in part 0"),
])
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path, damage, message):
    path = tmp_path / "shard-1.records"
    write_records(path, parts())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DuetError, match=message):
        read_records(path, "r1", 1, 2)


@pytest.mark.parametrize("written, message", [
    (parts(run_id="other"), "part 0 is not part 0 of shard 1/2 of this run"),
    (parts(shard=0), "part 0 is not part 0 of shard 1/2 of this run"),
    (parts(count=3), "part 0 is not part 0 of shard 1/2 of this run"),
    (parts()[:2], "shard 1's last part is missing"),
    (parts()[1:], "part 0 is not part 0"),
    ([], "shard 1's last part is missing"),
])
def test_records_of_another_run_shard_or_part_are_refused(tmp_path, written, message):
    path = tmp_path / "shard-1.records"
    write_records(path, written)
    with pytest.raises(DuetError, match=message):
        read_records(path, "r1", 1, 2)


def test_a_missing_file_and_another_message_are_named(tmp_path):
    with pytest.raises(DuetError, match="shard 1 wrote no records"):
        read_records(tmp_path / "absent.records", "r1", 1, 2)
    other = protocol.encode(protocol.DeadLetter(reason="x", topic="t", partition=0, offset=0, original=b"", at=0.0))
    (tmp_path / "dl.records").write_bytes(len(other).to_bytes(4, "big") + other)
    with pytest.raises(DuetError, match="part 0 is not part 0 of shard 1/2"):
        read_records(tmp_path / "dl.records", "r1", 1, 2)


def test_a_failing_shard_process_stops_the_run_with_its_exit_code(tmp_path):
    """A child that cannot run (here: its scenario file does not exist) ends the run with its exit code,
    not with a wait for records that never come."""
    with pytest.raises(DuetError, match=r"a shard process failed \(exit code 2\)"):
        asyncio.run(_memory_sharded("r1", [tmp_path / "a.records", tmp_path / "b.records"],
                                    ["run", str(tmp_path / "absent.yaml")], echo=lambda _: None))
