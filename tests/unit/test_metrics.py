"""The console line's ETA: the time left at this run's pace, also after a resume (elapsed counts this run only)."""

from megagpt.train.metrics import MetricsWriter


def test_eta_uses_the_steps_this_run_took(tmp_path):
    row = {"step": 60, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1.0, "elapsed_s": 100.0}
    fresh = MetricsWriter(tmp_path, tensorboard=False, total_steps=100)
    assert fresh.console_line(row).endswith("elapsed 0:01:40 | eta 0:01:06")  # 100 s / 60 steps * 40
    fresh.close()
    resumed = MetricsWriter(tmp_path, tensorboard=False, total_steps=100, resume_step=50)
    assert resumed.console_line(row).endswith("elapsed 0:01:40 | eta 0:06:40")  # 100 s / 10 steps * 40
    resumed.close()
