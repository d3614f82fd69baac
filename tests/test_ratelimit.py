"""bridge/ratelimit.py: the one throttle of every repeated log message."""

import logging

from bridge.ratelimit import RateLimitedLog


def test_rate_limited_log_keeps_each_key_to_one_line_per_interval_and_counts_the_rest(caplog):
    """bridge/ratelimit.py, the one throttle of every repeated message (OSC refusals, rejected
    values, lost sources, failed frames and sinks): per key, and the held-back count said next."""
    now = [100.0]
    throttle = RateLimitedLog(logging.getLogger("sdbridge.test"), interval=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="sdbridge.test"):
        assert throttle.warning("a", "lost %s", 1) and throttle.log(logging.ERROR, "b", "failed", exc_info=False)
        assert not any(throttle.warning("a", "lost %s", k) for k in range(2, 12))  # held back, counted
        now[0] += 4.9
        assert not throttle.warning("a", "lost %s", 12)
        now[0] += 0.1
        assert throttle.warning("a", "lost %s", 13)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "lost 1"), (logging.ERROR, "failed"),
        (logging.WARNING, "lost 13 (and 11 more like it in the last 5 s)")]
