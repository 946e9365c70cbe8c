import numpy as np
import pytest

from runtime_py import metrics


def tone(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t))[None].astype(np.float32)


@pytest.mark.parametrize("sr", [2000, 8000, 16000, 48000])
def test_loudness_is_finite_and_tracks_gain(sr):
    a = tone(220, sr)
    la, lb = metrics.loudness_lufs(a, sr), metrics.loudness_lufs(0.5 * a, sr)
    assert np.isfinite(la) and lb == pytest.approx(la - 6.02, abs=0.05)


def test_bs1770_full_scale_sine_at_48k():
    # BS.1770: a 997 Hz sine at 0 dBFS peak reads about -3.0 LUFS (K-weighting adds ~+0.7 dB there).
    assert metrics.loudness_lufs(tone(997, 48000, amp=1.0), 48000) == pytest.approx(-3.0, abs=0.3)


def test_paired_metrics_identity_and_order():
    sr = 8000
    a = tone(330, sr) + 0.05 * np.random.default_rng(0).standard_normal((1, sr)).astype(np.float32)
    same = metrics.paired_audio_metrics(a, a, sr)
    assert same["log_mel_l1"] == 0 and same["mrstft"] == pytest.approx(0, abs=1e-9)
    assert same["lsd_db"] == pytest.approx(0, abs=1e-9) and same["loudness_diff_db"] == 0
    small = metrics.paired_audio_metrics(a, a + 0.001, sr)
    large = metrics.paired_audio_metrics(a, a + 0.1 * np.random.default_rng(1).standard_normal(a.shape), sr)
    for k in metrics.DISTANCES:
        assert small[k] <= large[k], k
    assert metrics.snr_db(a, a) == float("inf")
    assert metrics.si_snr_db(a, 3 * a) > 100  # scale-invariant


def test_relative_to_spread():
    rel = metrics.relative_to_spread({"lsd_db": 1.0, "log_mel_l1": 0.5}, {"lsd_db": 4.0, "log_mel_l1": 1.0})
    assert rel == {"log_mel_l1": 0.5, "lsd_db": 0.25}
