"""A new file (or a file truncated in place) acked before its next checkpoint keeps its id across a kill -9.

Reproduces molecule image's `test_docker_stop_loses_no_line` failure ("98 lines in Kafka twice
at two different offsets of their files"): a rotation creates portal.log, its first records are
acked under a minted id, the agent is killed before the next checkpoint (1 s), and the restart
reads the file from 0 under a new id, which the consumer cannot dedup."""

import shutil
import time

from agent_support import append, first_pass, in_process, lines


def test_a_new_file_acked_before_its_first_checkpoint_keeps_its_id_after_a_kill(tmp_path):
    """Found by a scan: the agent's loop, or the drain on stop (SIGTERM), which a supervisor
    follows with SIGKILL once its stop timeout runs out. The drain's scan did not save new ids
    (the save was in the loop's scan only)."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "old.log").write_bytes(lines("o", 10))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, checkpoint_interval_ms=60_000)
    first_pass(agent, sender)
    agent.ledger.checkpoint({}, final=False)  # the state file exists and knows old.log
    new = logdir / "new.log"  # a rotation creates it
    append(new, lines("n", 50))
    agent.fileset.scan(time.monotonic())  # as the agent's loop and its drain on stop do
    assert any(f.path == str(new) for f in agent.fileset.files.values())  # found, not yet read
    agent.reader.read_all(time.time(), time.monotonic())
    agent.ledger.results()
    ids = {tok[1].identity.file_id for _, tok in sender.sent if tok[0].path == str(new)}
    assert len(ids) == 1, ids
    acked = [tok for _, tok in sender.sent if tok[0].path == str(new)]
    assert acked
    # kill -9: no final checkpoint. A new agent on the same state file:
    agent2, sender2 = in_process(tmp_path, logdir, auto_ack=True, checkpoint_interval_ms=60_000)
    first_pass(agent2, sender2)
    again = {tok[1].identity.file_id for _, tok in sender2.sent if tok[0].path == str(new)}
    assert again in (set(), ids), f"new.log shipped again under {again}, first under {ids}"


def test_a_file_truncated_in_place_keeps_its_new_id_after_a_kill(tmp_path):
    """copytruncate: the truncated file restarts at 0 under an id minted during a read."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    app = logdir / "app.log"
    app.write_bytes(lines("o", 50))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, checkpoint_interval_ms=60_000)
    first_pass(agent, sender)
    agent.ledger.checkpoint({}, final=False)  # the state file knows app.log at its end
    old_ids = {tok[1].identity.file_id for _, tok in sender.sent}
    shutil.copyfile(app, logdir / "app.log.1")  # logrotate's copytruncate
    with app.open("r+b") as fh:
        fh.truncate(0)
    append(app, lines("n", 10))  # shorter than before: the size tells the truncation
    sent_before = len(sender.sent)
    agent.reader.sweep = True
    agent.reader.read_all(time.time(), time.monotonic())
    agent.ledger.results()
    assert agent.counters.truncations == 1  # the fault happened
    new = [tok for _, tok in sender.sent[sent_before:] if tok[1].identity.file_id not in old_ids]
    ids = {tok[1].identity.file_id for tok in new}
    assert len(ids) == 1, ids  # the new content went out under one new id
    live = next(f for f in agent.fileset.files.values() if f.path == str(app))
    assert live.stream.acks.acked == app.stat().st_size  # and was acknowledged to its end
    # kill -9: no checkpoint since. A new agent on the same state file:
    agent2, sender2 = in_process(tmp_path, logdir, auto_ack=True, checkpoint_interval_ms=60_000)
    first_pass(agent2, sender2)
    again = {
        tok[1].identity.file_id
        for _, tok in sender2.sent
        if tok[0].path == str(app) and tok[1].identity.file_id not in old_ids
    }
    assert again in (set(), ids), f"app.log shipped again under {again}, first under {ids}"
