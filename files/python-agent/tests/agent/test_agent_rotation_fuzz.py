"""Seeded random sequences of writes, real logrotate runs, agent steps, kills and restarts.

The deterministic tests in test_agent_rotation_identity.py each came out of such a run; this
keeps a bounded one in CI so the next combination is caught here, not in production. Every
sequence keeps to what a running agent is owed: between a write and the next rotation it takes
at least one step (a rescan and a read pass, as its loop does: lines written and truncated away
before it ever looks at a file whose fingerprint is still empty cannot be told from an append),
and nothing rotates while it is down (rotations while stopped have their own tests). Under those
rules nothing may be shipped twice, and nothing lost silently, whatever the order of acks, kills
and restarts (a kill can leave unacknowledged bytes only in a rotated file deleted since: those
are counted lost).
"""

from __future__ import annotations

import random

import pytest
from agent_support import Rig

CONFIGS = {
    "copytruncate": "copytruncate\n  rotate 5\n  compress\n  delaycompress",
    "create": "create\n  rotate 5\n  compress\n  delaycompress",
}
SEEDS = range(25)
STEPS = 40


def _step(rig: Rig, rng: random.Random) -> None:
    """One turn of the agent's loop, with the producer's outcomes now or later.

    The rescan runs when it is due, so a read pass may come first or alone: both orders.
    """
    rig.agent.ledger.results()
    if rng.random() < 0.5:
        rig.scan()
        rig.read()
    else:
        rig.read()
        rig.scan()
        rig.read()
    if rng.random() < 0.7:
        rig.ack()


def _run(rig: Rig, rng: random.Random) -> list[str]:
    trace: list[str] = []
    looked = True  # a step since the last write and the last rotation
    for _ in range(STEPS):
        op = rng.choices(["write", "step", "rotate", "kill", "stop"], weights=[8, 8, 3, 1, 1])[0]
        if op == "rotate" and not looked:
            op = "step"
        trace.append(op)
        if op == "write":
            rig.write(rng.randint(1, 40))
            looked = False
        elif op == "step":
            _step(rig, rng)
            looked = True
        elif op == "rotate":
            rig.logrotate()
            looked = False
        elif op == "kill":
            rig.kill(delivered=rng.random() < 0.5)
            rig.start()
            looked = False  # restarted: it has not looked yet
        else:
            rig.stop()
            rig.start()
            looked = False
    if "rotate" not in trace:  # every sequence rotates at least once
        _step(rig, rng)
        rig.logrotate()
        trace += ["step", "rotate"]
    return trace


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pattern", ["*.log", "portal.log*"])
@pytest.mark.parametrize("rotation", sorted(CONFIGS))
def test_random_rotations_lose_and_duplicate_nothing(rig_factory, rotation, pattern, seed):
    rig = rig_factory(pattern=pattern, rotate=CONFIGS[rotation])
    rng = random.Random(seed)
    trace = _run(rig, rng)
    assert "rotate" in trace  # the fault happened
    rig.drain()
    # a kill can leave unacknowledged bytes only in a rotated file deleted since: counted lost
    rig.check(counted_loss=True)
