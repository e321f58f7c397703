"""A new file acked before its first checkpoint must keep its id across a kill -9.

Reproduces molecule image's `test_docker_stop_loses_no_line` failure ("98 lines in Kafka twice
at two different offsets of their files"): a rotation creates portal.log, its first records are
acked under a minted id, the agent is killed before the next checkpoint (1 s), and the restart
reads the file from 0 under a new id, which the consumer cannot dedup."""

import time

from agent_support import append, first_pass, in_process, lines


def test_a_new_file_acked_before_its_first_checkpoint_keeps_its_id_after_a_kill(tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    (logdir / "old.log").write_bytes(lines("o", 10))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, checkpoint_interval_ms=60_000)
    first_pass(agent, sender)
    agent.ledger.checkpoint({}, final=False)  # the state file exists and knows old.log
    new = logdir / "new.log"  # a rotation creates it
    append(new, lines("n", 50))
    agent.scan(time.monotonic())  # as the agent's loop does: finds new.log
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
