"""The intent slots (consumer/intents.py) and the recovery of the intents consumers left."""

from __future__ import annotations

import errno
import json
import os

import pytest

from keplerlog.consumer import intents
from keplerlog.consumer.journal import Journal, PartitionState


def test_records_alternate_and_the_newest_valid_one_wins(tmp_path):
    slots = intents.IntentSlots(tmp_path, "c1")
    for n in range(5):
        slots.write({"phase": "write", "n": n})
        assert intents.read_latest(slots.paths) == {"phase": "write", "n": n}
    seqs = sorted(intents.decode(p.read_bytes())[0] for p in slots.paths)
    assert seqs == [4, 5]  # the two newest, one per slot
    slots.close(remove=True)
    assert not any(p.exists() for p in slots.paths)


@pytest.mark.parametrize(
    "data",
    [b"", b"KLI1", b"KLI1 1 5 00000000\nabcde", b"garbage\n{}", b"KLI1 1 999999 00000000\n{}", b"\0" * 64],
)
def test_what_is_not_a_whole_record_is_none(data):
    assert intents.decode(data) is None


def test_a_record_longer_than_the_next_leaves_a_tail_that_is_ignored(tmp_path):
    slots = intents.IntentSlots(tmp_path, "c1")
    slots.write({"phase": "commit", "states": "x" * 5000})
    slots.write({"phase": "done"})
    slots.write({"phase": "write", "files": {}})  # over the long record, in place
    assert os.path.getsize(slots.paths[0]) > 5000
    assert intents.read_latest(slots.paths) == {"phase": "write", "files": {}}


def test_a_write_that_fails_halfway_keeps_the_last_good_record(tmp_path, monkeypatch):
    """A full disk while a record grows its slot: the torn slot is written again next time, the
    other one (the last good record) is never touched until a record has been written whole."""
    slots = intents.IntentSlots(tmp_path, "c1")
    slots.write({"phase": "done", "n": 1})
    real = os.pwrite
    failures = {"left": 2}

    def pwrite(fd, data, offset):
        if failures["left"]:
            failures["left"] -= 1
            real(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(intents.os, "pwrite", pwrite)
    for n in (2, 3):
        with pytest.raises(OSError):
            slots.write({"phase": "write", "files": {"a": [0, 1]}, "pad": "p" * 4000, "n": n})
        assert intents.read_latest(slots.paths) == {"phase": "done", "n": 1}
    assert failures["left"] == 0  # both failures happened
    slots.write({"phase": "write", "n": 4})
    assert intents.read_latest(slots.paths) == {"phase": "write", "n": 4}


def test_owner_of_names_only_slot_files(tmp_path):
    assert intents.owner_of(tmp_path / "host-1-abc.intent.0") == "host-1-abc"
    assert intents.owner_of(tmp_path / "host-1-abc.intent.1") == "host-1-abc"
    for name in ("host.intent.2", "host.intent.json", ".intent.0", "t-partition-0.json", "host.lock"):
        assert intents.owner_of(tmp_path / name) is None


def test_a_legacy_intent_json_is_still_recovered(tmp_path):
    """An intent left by a consumer from before the slots: one JSON file, write or commit."""
    state_dir = tmp_path / ".keplerlog/state"
    journal = Journal(str(tmp_path), "now")
    target = tmp_path / "shop" / "portal.20231114"
    target.parent.mkdir()
    target.write_bytes(b"kept\ntorn\n")
    (state_dir / "old1.intent.json").write_text(
        json.dumps({"consumer": "old1", "phase": "write", "files": {"shop/portal.20231114": [5, 5]}})
    )
    assert journal.dead_write_intent_for(["shop/portal.20231114"])
    state = PartitionState(7, {}, {})
    commit = {
        "consumer": "old2",
        "phase": "commit",
        "files": {},
        "states": {"t-partition-0.json": state.to_json()},
    }
    (state_dir / "old2.intent.json").write_text(json.dumps(commit))
    (state_dir / "old3.intent.json").write_text("{not json")
    assert journal.recover() == ["old1: rolled back", "old2: rolled forward", "old3: unreadable"]
    assert target.read_bytes() == b"kept\n"
    assert journal.load("t", 0).next_offset == 7
    assert not list(state_dir.glob("old*"))
    journal.close()


def test_a_dead_consumer_whose_intent_is_done_needs_nothing(tmp_path):
    dead = Journal(str(tmp_path), "dead")
    dead.begin({"shop/portal.20231114": (0, 4)})
    dead.clear()
    os.close(dead._lock_fd)  # dies: its lock is gone, its slots stay
    for fd in dead.intents._fds:
        os.close(fd)
    state_dir = tmp_path / ".keplerlog/state"
    assert sorted(p.name for p in state_dir.glob("dead.intent.*")) == ["dead.intent.0", "dead.intent.1"]
    other = Journal(str(tmp_path), "other")
    assert other.recover() == []
    assert not list(state_dir.glob("dead.*"))  # removed all the same
    other.close()
    assert not list(state_dir.glob("other.*"))  # a clean close leaves nothing
