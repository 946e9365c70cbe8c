"""Paired audio metrics in numpy: the one implementation used by runtime_py, toolkit and calibration.

Paired means same conditioning, same initial noise: compressed vs full-precision output. Each
distance is also judged relative to the full-precision model's own seed-to-seed spread (the same
distance between two full-precision runs that differ only in seed), see ``relative_to_spread``.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8

# Paired distances (lower is better) and their direction; latent_snr_db and si_snr_db are higher-is-better.
DISTANCES = ("log_mel_l1", "mrstft", "lsd_db", "loudness_diff_db")
HIGHER_IS_BETTER = ("latent_snr_db", "si_snr_db")


# An unchanged output has infinite SNR and JSON has no infinity: averaged or stored SNRs are capped
# here (:func:`capped_snr_db`). The one cap for every report, table and plan.
SNR_CAP_DB = 200.0


def capped_snr_db(value: float) -> float:
    """``value`` limited to :data:`SNR_CAP_DB` (for means and JSON; +inf becomes the cap)."""
    return float(min(value, SNR_CAP_DB))


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(‖ref‖² / ‖ref − test‖²); +inf for identical arrays."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.sum(ref * ref)), EPS) / noise))


def si_snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Scale-invariant SNR (Le Roux et al. 2019) over the flattened, mean-removed signals."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    est = np.asarray(test, dtype=np.float64).ravel()
    ref, est = ref - ref.mean(), est - est.mean()
    target = (est @ ref) / max(ref @ ref, EPS) * ref
    noise = est - target
    if float(noise @ noise) == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(target @ target), EPS) / float(noise @ noise)))


def _mono(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float64)
    return a if a.ndim == 1 else a.reshape(-1, a.shape[-1]).mean(axis=0)


def stft_power(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT|² (frames, n_fft // 2 + 1) of mono audio with a Hann window, centre-padded (reflect)."""
    x = _mono(audio)
    pad = n_fft // 2
    x = np.pad(x, pad, mode="reflect") if x.shape[0] > pad else np.pad(x, pad)
    n_frames = 1 + (x.shape[0] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    frames = x[idx] * np.hanning(n_fft + 1)[:-1]
    spec = np.fft.rfft(frames, axis=-1)
    return spec.real**2 + spec.imag**2


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filters (n_mels, n_fft // 2 + 1), 0 Hz to Nyquist."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / np.maximum(centre - lower, EPS)
    down = (upper - freqs[None]) / np.maximum(upper - centre, EPS)
    return np.maximum(0.0, np.minimum(up, down))


def log_mel(audio: np.ndarray, sample_rate: int, *, n_mels: int = 64) -> np.ndarray:
    """log(mel power + 1e-5), (frames, n_mels); ~46 ms windows, ~11.6 ms hop at any sample rate."""
    n_fft = int(2 ** np.round(np.log2(0.046 * sample_rate)))
    power = stft_power(audio, n_fft, n_fft // 4)
    return np.log(power @ mel_filterbank(sample_rate, n_fft, n_mels).T + 1e-5)


def log_mel_l1(reference: np.ndarray, test: np.ndarray, sample_rate: int) -> float:
    return float(np.mean(np.abs(log_mel(reference, sample_rate) - log_mel(test, sample_rate))))


def mrstft(reference: np.ndarray, test: np.ndarray, ffts: tuple[int, ...] = (512, 1024, 2048)) -> float:
    """Multi-resolution STFT distance: mean over resolutions of spectral convergence + log-magnitude L1."""
    total = 0.0
    for n_fft in ffts:
        r = np.sqrt(stft_power(reference, n_fft, n_fft // 4)) + 1e-5
        t = np.sqrt(stft_power(test, n_fft, n_fft // 4)) + 1e-5
        sc = np.linalg.norm(r - t) / max(np.linalg.norm(r), EPS)
        total += sc + float(np.mean(np.abs(np.log(r) - np.log(t))))
    return float(total / len(ffts))


def lsd_db(reference: np.ndarray, test: np.ndarray, *, n_fft: int = 1024) -> float:
    """Log-spectral distance: mean over frames of the RMS over bins of 10 log10(P_ref / P_test)."""
    r = stft_power(reference, n_fft, n_fft // 4) + 1e-10
    t = stft_power(test, n_fft, n_fft // 4) + 1e-10
    return float(np.mean(np.sqrt(np.mean((10.0 * np.log10(r / t)) ** 2, axis=-1))))


def _biquad(x: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Direct-form II transposed biquad (numpy only; runtime_py does not depend on scipy)."""
    y = np.empty_like(x)
    z1 = z2 = 0.0
    b0, b1, b2 = b / a[0]
    a1, a2 = a[1] / a[0], a[2] / a[0]
    for i, xi in enumerate(x):
        yi = b0 * xi + z1
        z1 = b1 * xi - a1 * yi + z2
        z2 = b2 * xi - a2 * yi
        y[i] = yi
    return y


def _k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """ITU-R BS.1770-4 K-weighting (high shelf + high pass), coefficients for any sample rate.

    The shelf is left out when its 1.7 kHz corner is not below 0.45 × the sample rate."""
    def shelf(fc, gain_db, q):
        k = np.tan(np.pi * fc / sample_rate)
        vh, vb = 10 ** (gain_db / 20), 10 ** (gain_db / 40)
        a0 = 1 + k / q + k * k
        return (np.array([vh + vb * k / q + k * k, 2 * (k * k - vh), vh - vb * k / q + k * k]) / a0,
                np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]))

    def highpass(fc, q):
        k = np.tan(np.pi * fc / sample_rate)
        a0 = 1 + k / q + k * k
        return (np.array([1.0, -2.0, 1.0]),
                np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]))

    stages = [highpass(38.13547087602444, 0.5003270373238773)]
    shelf_hz = 1681.974450955533
    # The +4 dB shelf acts above ~1.7 kHz; at rates whose band ends below it (the 2 kHz demo) there
    # is nothing for it to weight, and its bilinear transform is undefined past Nyquist.
    if shelf_hz < 0.45 * sample_rate:
        stages.insert(0, shelf(shelf_hz, 3.999843853973347, 0.7071752369554196))
    return stages


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (BS.1770-4: K-weighting, 400 ms blocks at 75 % overlap, −70 LUFS and
    relative −10 LU gates). Channels are weighted equally (mono/stereo)."""
    a = np.asarray(audio, dtype=np.float64)
    a = a[None] if a.ndim == 1 else a.reshape(-1, a.shape[-1])
    weighted = []
    for ch in a:
        for b, den in _k_weighting(sample_rate):
            ch = _biquad(ch, b, den)
        weighted.append(ch)
    w = np.stack(weighted)
    block, hop = int(0.4 * sample_rate), int(0.1 * sample_rate)
    if w.shape[-1] < block:
        block = hop = w.shape[-1]
    starts = range(0, w.shape[-1] - block + 1, hop)
    z = np.array([np.sum(np.mean(w[:, s:s + block] ** 2, axis=-1)) for s in starts])
    lk = -0.691 + 10 * np.log10(z + 1e-12)
    z = z[lk > -70.0]
    if z.size == 0:
        return -70.0
    rel = -0.691 + 10 * np.log10(np.mean(z) + 1e-12) - 10.0
    z = z[-0.691 + 10 * np.log10(z + 1e-12) > rel]
    return float(-0.691 + 10 * np.log10(np.mean(z) + 1e-12))


def loudness_diff_db(reference: np.ndarray, test: np.ndarray, sample_rate: int) -> float:
    return abs(loudness_lufs(reference, sample_rate) - loudness_lufs(test, sample_rate))


def paired_audio_metrics(reference: np.ndarray, test: np.ndarray, sample_rate: int) -> dict[str, float]:
    """All paired audio distances between two renderings of the same conditioning and noise."""
    return {
        "log_mel_l1": log_mel_l1(reference, test, sample_rate),
        "mrstft": mrstft(reference, test),
        "lsd_db": lsd_db(reference, test),
        "loudness_diff_db": loudness_diff_db(reference, test, sample_rate),
        "si_snr_db": si_snr_db(reference, test),
    }


def relative_to_spread(distance: dict[str, float], spread: dict[str, float]) -> dict[str, float]:
    """Each distance divided by the full-precision seed-to-seed spread of the same metric."""
    return {k: float(distance[k] / max(spread[k], EPS)) for k in DISTANCES if k in distance and k in spread}
