"""Stress (marked slow, run in CI): many threads over two devices, thousands of tiny steps, random
delays. No deadlock (every epoch under a timeout and the crew's watchdog), no lost update, staleness
within the window's bound, and in-flight items (hence residual memory) never above the window."""

import pytest
from conftest import replace

from asyncsgd.data import steps_per_epoch
from asyncsgd import trainers
from asyncsgd.assemble import build_session
from asyncsgd.metrics import peak_rss_mb
from asyncsgd.trainers import EpochPlan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("trainer", ["pdasgd", "hogwild"])
def test_three_forward_eight_backward_threads_two_devices_random_delays(tiny_config, tiny_data, trainer):
    config = replace(tiny_config, trainer=trainer, model="mlp", devices=2, forward_threads=3, backward_threads=8,
                     workers=6, max_inflight=3, batch_size=8, lr=0.005, delay="exp:mean=0.0005", watchdog_s=30.0)
    session, _ = build_session(config, tiny_data.normalized())
    per_epoch = steps_per_epoch(len(tiny_data.train_y), config.batch_size)
    epochs = 40  # 2560 steps
    rss_after_warmup = None
    for epoch in range(epochs):
        result = trainers.get(trainer).run_epoch(session, EpochPlan(epoch, epoch * per_epoch, per_epoch))
        session.recorder.tick()
        assert result.batches == per_epoch
        assert result.peak_inflight <= result.window_size  # in-flight items (and their residuals) bounded
        if epoch == 5:
            rss_after_warmup = peak_rss_mb()
    recorder, store = session.recorder, session.store
    steps = epochs * per_epoch
    assert recorder.steps == steps
    for stage in range(len(store)):
        commits = [u for u in recorder.updates if u.stage == stage]
        assert len(commits) == steps == store.read(stage).version  # no update lost
        assert sorted(u.version_commit for u in commits) == list(range(steps))
    bound = trainers.get(trainer).staleness_bound(config)
    assert max(u.staleness for u in recorder.updates) <= bound
    assert session.units.max_trace_count() == 1
    # Memory flat: after the first epochs the peak RSS grows by little more than the update log.
    assert peak_rss_mb() - rss_after_warmup < 150, (rss_after_warmup, peak_rss_mb())
