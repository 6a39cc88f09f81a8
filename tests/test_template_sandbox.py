"""The sandbox of requests' own chat templates (server/template_sandbox.py): children are
reused across renders and template errors, replaced when they die or run past their time,
and gone after close()."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fairswitch.server.template_sandbox import RenderError, TemplateSandbox, TemplateTimeout


def test_children_are_reused_replaced_and_closed():
    box = TemplateSandbox(0.5, max_children=1)
    try:
        assert box.render("{{ a }}-{{ b }}", {"a": 1, "b": "x"}) == "1-x"
        (child,) = box._idle
        with pytest.raises(RenderError) as e:  # (the template's error: the child stays)
            box.render("{{ 1 / 0 }}", {})
        assert e.value.type_name == "ZeroDivisionError" and not e.value.jinja
        assert box._idle == [child]
        with pytest.raises(RenderError) as e:
            box.render("{{ raise_exception('roles must alternate') }}", {})
        assert e.value.jinja and box._idle == [child]
        os.kill(child.process.pid, signal.SIGKILL)  # (dies while idle: a new one renders)
        child.process.join(5)
        assert box.render("ok", {}) == "ok" and box._idle[0] is not child
        t0 = time.monotonic()
        with pytest.raises(TemplateTimeout):
            box.render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                       "{% endfor %}", {})
        assert time.monotonic() - t0 < 5 and not box._idle  # (killed, not kept)
        assert box.render("again", {}) == "again"
        last = box._idle[0]
    finally:
        box.close()
    last.process.join(5)
    assert not last.process.is_alive() and not box._idle
