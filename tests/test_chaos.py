"""A small chaos run: the real workers on the simulator with faults, kill -9 of random workers, then KILL."""

from __future__ import annotations

from imageselector.proving import chaos


def test_pipeline_survives_kill_9_and_faults_consistently(home):
    opts = chaos.ChaosOptions(home=home, listings=20, kills=3, kill_every_s=2.0, settle_timeout_s=90, seed=3)
    res = chaos.run(opts, log=lambda _msg: None)
    print(res.tally())
    assert res.kills == 3
    assert res.restarts >= 3  # every killed worker came back (sync may also have finished meanwhile)
    assert res.settled, "the backlog did not finish after the kills"
    assert res.rows > 20
    assert res.done["download"] + res.parked["download"] == res.rows
    assert min(v for k, v in res.done.items() if k.startswith("embed_")) == res.done["bg"] > 0
    assert res.problems == []
    assert res.stop_s < opts.kill_timeout_s
