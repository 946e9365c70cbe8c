"""Synthetic pairs, the stems loader and the musical-agreement measures."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import soundfile

from toolkit.data import music, stems, synth
from toolkit.data.stems import StemsError

SR = 16000
SECONDS = 8.0
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def pairs():
    return [synth.synth_pair(seed, seconds=SECONDS, sample_rate=SR) for seed in SEEDS]


def _write(path, audio_cn, sample_rate=SR, subtype="FLOAT"):
    soundfile.write(path, np.asarray(audio_cn, dtype=np.float32).T, sample_rate, subtype=subtype)


def _tone(n, *, hz=220.0, channels=1, sample_rate=SR, amplitude=0.3):
    t = np.arange(n) / sample_rate
    return np.repeat((amplitude * np.sin(2 * np.pi * hz * t))[None, :], channels, axis=0).astype(np.float32)


# --------------------------------------------------------------------------------------- synth


def test_synth_pair_is_deterministic():
    v1, a1, l1 = synth.synth_pair(7, seconds=3.0, sample_rate=SR)
    v2, a2, l2 = synth.synth_pair(np.random.default_rng(7), seconds=3.0, sample_rate=SR)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(a1, a2)
    assert l1["seed"] == 7 and l2["seed"] is None  # a Generator's seed cannot be recovered
    assert {k: v for k, v in l1.items() if k != "seed"} == {k: v for k, v in l2.items() if k != "seed"}
    v3, _, _ = synth.synth_pair(8, seconds=3.0, sample_rate=SR)
    assert not np.array_equal(v1, v3)


def test_synth_pair_format_and_mix():
    vocals, accompaniment, labels = synth.synth_pair(3, seconds=2.0, sample_rate=SR, channels=2)
    assert vocals.shape == accompaniment.shape == (2, 2 * SR)
    assert vocals.dtype == accompaniment.dtype == np.float32
    np.testing.assert_array_equal(vocals[0], vocals[1])
    for x in (vocals, accompaniment, vocals + accompaniment):
        assert np.all(np.isfinite(x)) and np.abs(x).max() <= synth.PEAK + 1e-6
    assert math.isclose(np.abs(vocals + accompaniment).max(), synth.PEAK, rel_tol=1e-4) or math.isclose(
        max(np.abs(vocals).max(), np.abs(accompaniment).max()), synth.PEAK, rel_tol=1e-4)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))  # noqa: E731
    assert rms(vocals) == pytest.approx(rms(accompaniment), rel=1e-3)  # VOCALS_TO_ACCOMPANIMENT_DB = 0
    with pytest.raises(ValueError, match="channels"):
        synth.synth_pair(3, seconds=1.0, sample_rate=SR, channels=3)
    with pytest.raises(ValueError, match="seconds"):
        synth.synth_pair(3, seconds=0.5, sample_rate=SR)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_labels_are_consistent(seed):
    seconds = 6.0
    labels = synth.sample_score(np.random.default_rng(seed), seconds=seconds)
    assert json.loads(json.dumps(labels)) == labels
    tempo = labels["tempo_bpm"]
    assert synth.TEMPO_RANGE_BPM[0] <= tempo <= synth.TEMPO_RANGE_BPM[1]
    beats = np.array(labels["beat_times_s"])
    assert beats[0] == 0.0 and beats[-1] < seconds <= beats[-1] + 60.0 / tempo + 1e-9
    np.testing.assert_allclose(np.diff(beats), 60.0 / tempo)

    chords = labels["chords"]
    assert chords[0]["start_s"] == 0.0 and chords[-1]["end_s"] == seconds
    for previous, chord in zip(chords, chords[1:]):
        assert chord["start_s"] == pytest.approx(previous["end_s"])
    scale = set(labels["key"]["scale_pitch_classes"])
    assert labels["key"]["tonic_pc"] in scale and labels["key"]["tonic"] == synth.NOTE_NAMES[labels["key"]["tonic_pc"]]
    for chord in chords:
        intervals = synth.QUALITY_INTERVALS[chord["quality"]]
        assert chord["pitch_classes"] == [(chord["root_pc"] + i) % 12 for i in intervals]
        assert set(chord["pitch_classes"]) <= scale  # diatonic
        assert chord["name"] == synth.chord_name(chord["root_pc"], chord["quality"])

    melody = labels["melody"]
    assert melody
    eighth_s = 30.0 / tempo
    low, high = labels["melody_range_midi"]
    for note in melody:
        assert note["midi"] % 12 in scale and low <= note["midi"] <= high
        assert 0.0 <= note["start_s"] < note["end_s"] <= seconds + 1e-9
        for t in (note["start_s"], note["end_s"]):
            assert t / eighth_s == pytest.approx(round(t / eighth_s), abs=1e-6)  # on the grid
        if round(note["start_s"] / eighth_s) % 4 == 0:  # beats 1 and 3 carry chord tones
            chord = next(c for c in chords if c["start_s"] <= note["start_s"] + 1e-9 < c["end_s"])
            assert note["midi"] % 12 in chord["pitch_classes"]
    for previous, note in zip(melody, melody[1:]):
        assert note["start_s"] >= previous["end_s"] - 1e-9


def test_write_synth_dataset(tmp_path, capfd):
    out = tmp_path / "set"
    paths = synth.write_synth_dataset(out, n=3, seconds=1.5, sample_rate=8000, seed=11, progress=True)
    assert capfd.readouterr().err  # a progress bar went to stderr
    assert paths == [out / f"synth_{i:05d}" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary sibling left
    for path in paths:
        assert sorted(p.name for p in path.iterdir()) == ["accompaniment.wav", "labels.json", "vocals.wav"]
        info = soundfile.info(path / "vocals.wav")
        assert (info.samplerate, info.channels, info.frames) == (8000, 1, 12000)

    # Track i depends on (seed, i) only, not on n.
    fewer = synth.write_synth_dataset(tmp_path / "fewer", n=2, seconds=1.5, sample_rate=8000, seed=11, progress=False)
    assert json.loads((fewer[1] / "labels.json").read_text()) == json.loads((paths[1] / "labels.json").read_text())
    np.testing.assert_array_equal(soundfile.read(fewer[1] / "vocals.wav")[0], soundfile.read(paths[1] / "vocals.wav")[0])
    labels = json.loads((paths[1] / "labels.json").read_text())
    assert labels["seed"] == synth.track_seed(11, 1) and labels["index"] == 1 and labels["sample_rate"] == 8000

    with pytest.raises(FileExistsError, match="not an empty directory"):
        synth.write_synth_dataset(out, n=1, seconds=1.0, sample_rate=8000, progress=False)
    (tmp_path / "empty").mkdir()
    assert len(synth.write_synth_dataset(tmp_path / "empty", n=1, seconds=1.0, sample_rate=8000, progress=False)) == 1


# --------------------------------------------------------------------------------------- stems


def test_load_synthetic_track_round_trips(tmp_path):
    out = tmp_path / "set"
    synth.write_synth_dataset(out, n=2, seconds=1.5, sample_rate=SR, seed=5, progress=False)
    (out / ".cache").mkdir()  # hidden folders are not tracks
    tracks = stems.list_tracks(out)
    assert [t.name for t in tracks] == ["synth_00000", "synth_00001"]
    track = stems.load_track(tracks[1], sample_rate=SR, channels=1)
    vocals, accompaniment, labels = synth.synth_pair(synth.track_seed(5, 1), seconds=1.5, sample_rate=SR)
    assert track.layout == "accompaniment" and track.name == "synth_00001"
    assert track.vocals.dtype == np.float32 and track.vocals.shape == (1, int(1.5 * SR))
    np.testing.assert_array_equal(track.vocals, vocals)
    np.testing.assert_array_equal(track.accompaniment, accompaniment)
    assert track.labels["tempo_bpm"] == labels["tempo_bpm"] and track.labels["chords"] == labels["chords"]


def test_load_musdb_layout_sums_accompaniment(tmp_path):
    track_dir = tmp_path / "song"
    track_dir.mkdir()
    n = 4000
    parts = {name: _tone(n, hz=hz, channels=2) for name, hz in
             (("drums.wav", 100.0), ("bass.wav", 200.0), ("other.wav", 300.0))}
    for name, audio in parts.items():
        _write(track_dir / name, audio)
    _write(track_dir / "vocals.wav", _tone(n, hz=440.0, channels=2))
    (track_dir / "mixture.wav").write_bytes(b"")  # unrelated files are ignored
    track = stems.load_track(track_dir, sample_rate=SR, channels=2)
    assert track.layout == "musdb" and track.labels is None
    np.testing.assert_allclose(track.accompaniment, sum(parts.values()), atol=1e-6)
    assert track.vocals.shape == track.accompaniment.shape == (2, n)


def test_load_resamples_fixes_channels_and_trims(tmp_path):
    track_dir = tmp_path / "t"
    track_dir.mkdir()
    _write(track_dir / "vocals.wav", _tone(44100, hz=440.0, channels=2, sample_rate=44100), sample_rate=44100)
    _write(track_dir / "accompaniment.wav", _tone(40000, hz=220.0, channels=1, sample_rate=44100), sample_rate=44100)
    mono = stems.load_track(track_dir, sample_rate=SR, channels=1)
    expected = math.ceil(40000 * SR / 44100)  # resample_poly length; trimmed to the shorter stem
    assert mono.vocals.shape == mono.accompaniment.shape == (1, expected)
    spectrum = np.abs(np.fft.rfft(mono.vocals[0]))
    assert np.fft.rfftfreq(expected, 1 / SR)[np.argmax(spectrum)] == pytest.approx(440.0, abs=1.0)
    stereo = stems.load_track(track_dir, sample_rate=SR, channels=2)
    np.testing.assert_array_equal(stereo.accompaniment[0], stereo.accompaniment[1])  # mono duplicated
    np.testing.assert_allclose(stereo.vocals.mean(axis=0), mono.vocals[0], atol=1e-6)  # stereo averaged


def test_segments_and_crop(pairs):
    vocals, accompaniment, labels = pairs[0]
    track = stems.Track(name="x", vocals=vocals, accompaniment=accompaniment, sample_rate=SR, labels=labels,
                        layout="accompaniment")
    pieces = stems.segments(track, segment_samples=SR * 3)
    assert len(pieces) == 2 and all(v.shape == a.shape == (1, SR * 3) for v, a in pieces)
    np.testing.assert_array_equal(pieces[1][0], vocals[:, SR * 3:SR * 6])
    assert len(stems.segments(track, segment_samples=SR * 3, hop_samples=SR)) == 6
    assert stems.segments(track, segment_samples=SR * 9) == []
    v, a = stems.crop(track, segment_samples=1000, rng=np.random.default_rng(0))
    assert v.shape == a.shape == (1, 1000)
    start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(vocals[0], 1000) == v[0], axis=1))[0])
    np.testing.assert_array_equal(a, accompaniment[:, start:start + 1000])
    with pytest.raises(ValueError, match="shorter segment"):
        stems.crop(track, segment_samples=SR * 9, rng=np.random.default_rng(0))


def _make(track_dir, files):
    track_dir.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (track_dir / name).write_bytes(content)
        else:
            _write(track_dir / name, content)


_OK = _tone(2000)
_SILENT = np.zeros((1, 2000), dtype=np.float32)
_NAN = _tone(2000).copy()
_NAN[0, 100] = np.nan


@pytest.mark.parametrize(
    ("files", "named", "problem"),
    [
        ({"accompaniment.wav": _OK}, "vocals.wav", "missing"),
        ({"vocals.wav": _OK, "drums.wav": _OK, "other.wav": _OK}, "bass.wav", "missing"),
        ({"vocals.wav": _OK}, "accompaniment.wav", "neither layout"),
        ({"notes.txt": b"hello"}, "vocals.wav", "neither layout"),
        ({"vocals.wav": _OK, "accompaniment.wav": b"RIFF1234WAVEjunk" * 8}, "accompaniment.wav", "corrupt"),
        ({"vocals.wav": b"", "accompaniment.wav": _OK}, "vocals.wav", "empty"),
        ({"vocals.wav": _OK, "accompaniment.wav": np.zeros((1, 0), np.float32)}, "accompaniment.wav", "empty"),
        ({"vocals.wav": _SILENT, "accompaniment.wav": _OK}, "vocals.wav", "silent"),
        ({"vocals.wav": _OK, "accompaniment.wav": _SILENT}, "accompaniment.wav", "silent"),
        ({"vocals.wav": _SILENT, "accompaniment.wav": _SILENT}, "both", "silent"),
        ({"vocals.wav": _OK, "drums.wav": _SILENT, "bass.wav": _SILENT, "other.wav": _SILENT}, "other.wav", "silent"),
        ({"vocals.wav": _NAN, "accompaniment.wav": _OK}, "vocals.wav", "NaN"),
        ({"vocals.wav": np.repeat(_OK, 6, axis=0), "accompaniment.wav": _OK}, "vocals.wav", "6 channels"),
    ],
    ids=["no-vocals", "musdb-missing", "vocals-only", "no-stems", "corrupt", "zero-bytes", "zero-samples",
         "silent-vocals", "silent-accompaniment", "both-silent", "musdb-silent", "nan", "six-channels"],
)
def test_load_track_rejects_with_file_and_problem(tmp_path, files, named, problem):
    _make(tmp_path / "bad", files)
    with pytest.raises(StemsError) as excinfo:
        stems.load_track(tmp_path / "bad", sample_rate=SR, channels=1)
    message = str(excinfo.value)
    assert named in message and problem in message and str(tmp_path / "bad") in message
    assert isinstance(excinfo.value, ValueError)


def test_musdb_track_with_a_silent_part_is_fine(tmp_path):
    _make(tmp_path / "t", {"vocals.wav": _OK, "drums.wav": _OK, "bass.wav": _SILENT, "other.wav": _OK})
    assert stems.load_track(tmp_path / "t", sample_rate=SR, channels=1).layout == "musdb"


def test_list_tracks_rejects_empty_root(tmp_path):
    with pytest.raises(StemsError, match="no track folders"):
        stems.list_tracks(tmp_path)
    with pytest.raises(StemsError, match="not a directory"):
        stems.list_tracks(tmp_path / "absent")


# --------------------------------------------------------------------------------------- music


def test_chroma_of_a_tone_peaks_at_its_pitch_class():
    c = music.chroma(_tone(SR, hz=440.0)[0], SR)  # A4
    assert c.shape[0] == 12 and np.argmax(c.sum(axis=1)) == 9
    c = music.chroma(_tone(SR, hz=float(synth.midi_to_hz(40)))[0], SR)  # E2: bass register
    assert np.argmax(c.sum(axis=1)) == 4


def test_chord_agreement_separates_true_from_noise_and_wrong_key(pairs):
    true, noise, wrong = [], [], []
    for seed, (_, accompaniment, labels) in zip(SEEDS, pairs):
        result = music.chord_agreement(accompaniment, SR, labels)
        assert result["chance_accuracy"] == pytest.approx(1 / 24)
        assert result["n_dim_excluded"] == sum(c["quality"] == "dim" for c in labels["chords"])
        assert result["chord_cosine"] > 0.8
        true.append(result["chord_accuracy"])
        white = np.random.default_rng(seed).standard_normal(accompaniment.shape[1])
        noise.append(music.chord_agreement(white, SR, labels)["chord_accuracy"])
        transposed = copy.deepcopy(labels)  # same timing, every chord a tritone away
        for chord in transposed["chords"]:
            chord["root_pc"] = (chord["root_pc"] + 6) % 12
            chord["pitch_classes"] = [(pc + 6) % 12 for pc in chord["pitch_classes"]]
        wrong_audio = synth.render_accompaniment(transposed, np.random.default_rng(seed), sample_rate=SR)
        wrong.append(music.chord_agreement(wrong_audio, SR, labels)["chord_accuracy"])
    assert np.mean(true) > 0.7
    assert np.mean(noise) < 0.25
    assert np.mean(wrong) < 0.25


def test_beat_alignment_needs_onsets_on_the_beats(pairs):
    rng = np.random.default_rng(0)
    for _, accompaniment, labels in pairs:
        assert music.beat_alignment(accompaniment, SR, labels) > 3.0
        assert 0.5 < music.beat_alignment(rng.standard_normal(accompaniment.shape), SR, labels) < 1.5
        # The right tempo at the wrong phase: the same audio a quarter of a beat late.
        shift = int(round(60.0 / labels["tempo_bpm"] / 4 * SR))
        late = np.concatenate([np.zeros_like(accompaniment[..., :shift]), accompaniment[..., :-shift]], axis=-1)
        assert music.beat_alignment(late, SR, labels) < 1.0


def test_tempo_agreement_on_accompaniment(pairs):
    for _, accompaniment, labels in pairs:
        result = music.tempo_agreement(accompaniment, SR, labels)
        assert result["tempo_match"], result
        assert result["tempo_bpm_true"] == labels["tempo_bpm"]
