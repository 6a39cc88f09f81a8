"""A tensor-parallel step that does not come back in time has every thread's stack written to
stderr while it goes on; one that returns in time writes nothing."""

from __future__ import annotations

import faulthandler
import threading
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


def test_the_applications_faulthandler_timer_survives_a_step(tmp_path):
    """faulthandler has one timer per process: arming and cancelling it for each step took it
    from the application (pytest's faulthandler_timeout, a server's watchdog)."""
    with open(tmp_path / "app_watchdog.txt", "w+") as out:
        faulthandler.dump_traceback_later(0.3, file=out)
        try:
            with report_stall(5.0):
                pass
            time.sleep(0.6)
            out.seek(0)
            assert "test_the_applications_faulthandler_timer_survives_a_step" in out.read()
        finally:
            faulthandler.cancel_dump_traceback_later()


def test_steps_in_several_threads_each_report_once(capfd):
    """A late step is reported once, even while another thread's step returns in time."""
    late = threading.Thread(target=lambda: _in_step(0.1, _slow_step))
    late.start()
    for _ in range(20):
        _in_step(5.0, lambda: time.sleep(0.01))
    late.join()
    time.sleep(0.2)
    err = capfd.readouterr().err
    assert err.count("has not returned after 0.1 s") == 1 and "_slow_step" in err
    assert "after 5 s" not in err


def _in_step(after_s, body):
    with report_stall(after_s):
        body()
