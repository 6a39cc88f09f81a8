"""A tensor-parallel step that does not come back in time has every thread's stack written to
stderr while it goes on; one that returns in time writes nothing."""

from __future__ import annotations

import time

from fairswitch.distributed.stall_report import report_stall


def _slow_step() -> None:
    time.sleep(0.6)


def test_a_step_past_the_limit_reports_where_it_waits(capfd):
    with report_stall(0.1):
        _slow_step()
    err = capfd.readouterr().err
    assert "_slow_step" in err and "test_stall_report.py" in err


def test_a_step_in_time_reports_nothing(capfd):
    with report_stall(0.5):
        pass
    time.sleep(0.7)  # past the limit, after the step: nothing is armed any more
    assert capfd.readouterr().err == ""
