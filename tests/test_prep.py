"""prep.py and utils.py's words, word times and tags: formats, frame times, tagging, splits, bad
input, resume after a kill, and the demo set."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_ARGS, ROOT, frame_level

import common
import demo
import prep
import utils

VFR_TIMES = [0, 0.1, 0.35, 0.4, 0.9, 1.0, 1.3, 1.55, 2.05, 2.4, 2.5, 3.1, 3.2]  # irregular pts
CANVAS = ["--height", "56", "--width", "84"]


def run_prep(*argv) -> int:
    return prep.main([str(a) for a in argv] + ["--workers", "1"])


def decoded_times(path: Path) -> list[float]:
    """pts times of every frame, by a plain PyAV decode independent of prep.py."""
    import av

    with av.open(str(path)) as c:
        return [float(f.pts * f.time_base) for f in c.decode(c.streams.video[0])]


def read_report(out: Path) -> dict:
    return json.loads((out / "prep_report.json").read_text())


def write_json_file(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# -------------------------------------------------------------------------------------------
# Pure pieces: utils.py's words, times, tags and letterbox; prep.py's sampling
# -------------------------------------------------------------------------------------------


def test_nearest_frame_ties_go_to_the_earlier_frame():
    t = np.array([0.0, 1.0, 2.0, 4.0])
    assert common.nearest_frame(t, 0.5) == 0  # tie
    assert common.nearest_frame(t, 3.0) == 2  # tie
    assert common.nearest_frame(t, 0.51) == 1
    assert common.nearest_frame(t, 2.0) == 2
    assert common.nearest_frame(t, -5.0) == 0
    assert common.nearest_frame(t, 9.0) == 3
    assert common.nearest_frame(np.array([1.5]), 0.0) == 0


def test_clip_frame_index_sorts_by_time():
    rows = [
        {"clip_id": "b", "frame_idx": 5, "t_sec": 2.0},
        {"clip_id": "a", "frame_idx": 1, "t_sec": 1.0},
        {"clip_id": "b", "frame_idx": 4, "t_sec": 0.5},
    ]
    idx = utils.clip_frame_index(rows)
    assert idx["b"][0].tolist() == [4, 5] and idx["b"][1].tolist() == [0.5, 2.0]
    assert idx["a"][0].dtype == np.int64 and idx["a"][1].dtype == np.float64


def test_split_words_drops_edge_punctuation():
    text = "Look, the man's \"dog\" -- waves... don't!"
    assert [text[a:b] for a, b in utils.split_words(text)] == [
        "Look",
        "the",
        "man's",
        "dog",
        "waves",
        "don't",
    ]


def test_word_time_rules():
    text = "ab cdef g"
    spans = utils.split_words(text)  # centres at chars 1, 5, 8.5 of 9
    t, rule = utils.word_times(spans, len(text), start=10.0, end=19.0)
    assert rule == "spread" and t == pytest.approx([11.0, 15.0, 18.5])
    t, rule = utils.word_times(spans, len(text), timestamp=7.0)
    assert rule == "timestamp" and t == [7.0, 7.0, 7.0]
    t, rule = utils.word_times(spans, len(text), given=[1.0, 2.0, 3.0], start=10.0, end=19.0)
    assert rule == "given" and t == [1.0, 2.0, 3.0]
    t, rule = utils.word_times(spans, len(text), given=[1.0, None, 3.0], start=10.0, end=19.0)
    assert rule == "given+spread" and t == pytest.approx([1.0, 15.0, 3.0])
    with pytest.raises(ValueError, match="no word times"):
        utils.word_times(spans, len(text))


def test_pos_tagging_is_in_context_and_maps_to_words():
    tagger = utils.PosTagger()
    (a, b, c) = tagger.tag(["They book a room.", "I read the book.", "Look, the man waves."])
    assert [w["text"] for w in c] == ["Look", "the", "man", "waves"]
    assert (c[2]["char_start"], c[2]["char_end"]) == (10, 13)
    assert a[1]["text"] == b[3]["text"] == "book"
    assert a[1]["pos"] == "VERB" and b[3]["pos"] == "NOUN"  # the same word, tagged in context
    assert c[0]["pos"] == "VERB" and c[0]["content"] and not c[1]["content"]
    nouns = utils.PosTagger(content_pos=("NOUN",)).tag(["I read the book."])[0]
    assert [w["content"] for w in nouns] == [False, False, False, True]


def test_letterbox_keeps_the_whole_frame():
    img = np.full((100, 300, 3), 255, dtype=np.uint8)
    img[:, :10] = [255, 0, 0]  # a person at the very edge must survive
    out = utils.letterbox(img, 224, 392)
    assert out.shape == (224, 392, 3) and out.dtype == np.uint8
    rows = np.flatnonzero(out[:, 200].sum(-1) > 0)
    assert (rows[0], rows[-1] + 1) == ((224 - 131) // 2, (224 - 131) // 2 + 131)
    assert out[0, 0].sum() == 0 and out[-1, -1].sum() == 0
    assert out[112, 2, 0] > 200 and out[112, 2, 1] < 60  # the red edge is kept


def test_sample_takes_the_first_frame_at_or_after_each_target():
    frames = [(Fraction(t).limit_denominator(1000), t) for t in VFR_TIMES]
    assert [t for _, t in prep.sample(frames, 2)] == [0, 0.9, 1.0, 1.55, 2.05, 2.5, 3.1]
    every_2s = prep.sample([(Fraction(t), t) for t in range(7)], 0.5)
    assert [t for _, t in every_2s] == [0, 2, 4, 6]


# -------------------------------------------------------------------------------------------
# Transcript formats on real videos
# -------------------------------------------------------------------------------------------

UTTS = [("Alice", "The red woman waves.", 0.3, 1.2), ("Bob", "Now the man sits down!", 1.5, 3.0)]


def write_transcript(folder: Path, stem: str, fmt: str) -> Path:
    if fmt in ("conversation", "conversation-timestamp"):
        turns = [
            {"speaker": s, "utterance": t, "timestamp": a}
            | ({"start": a, "end": b} if fmt == "conversation" else {})
            for s, t, a, b in UTTS
        ]
        return write_json_file(folder / f"{stem}.json", {"conversation_id": stem, "turns": turns})
    if fmt == "seamless":
        segs = []
        for _, text, a, b in UTTS:
            words = text.split()
            step = (b - a) / len(words)
            ws = [
                {"word": w, "start": a + k * step, "end": a + (k + 0.5) * step, "score": 0.9}
                for k, w in enumerate(words)
            ]
            segs.append({"start": a, "end": b, "transcript": text, "words": ws})
        return write_json_file(folder / f"{stem}.json", {"id": stem, "metadata:transcript": segs})

    def stamp(t):
        return f"00:00:{int(t):02d}{',' if fmt == 'srt' else '.'}{round(t % 1 * 1000):03d}"

    if fmt == "srt":
        cues = [f"{k + 1}\n{stamp(a)} --> {stamp(b)}\n{t}\n" for k, (_, t, a, b) in enumerate(UTTS)]
        (folder / f"{stem}.srt").write_text("\n".join(cues))
    else:
        cues = [f"{stamp(a)} --> {stamp(b)}\n<v {s}>{t}</v>\n" for s, t, a, b in UTTS]
        header = "WEBVTT\nKind: captions\n\nNOTE made by a test\n\n"  # header lines, a comment
        (folder / f"{stem}.vtt").write_text(header + "\n".join(cues))
    return folder / f"{stem}.{fmt}"


@pytest.mark.parametrize(
    "fmt,ext",
    [("conversation", ".mp4"), ("conversation-timestamp", ".mkv"), ("seamless", ".mp4")]
    + [("srt", ".webm"), ("vtt", ".mov")],
)
def test_transcript_format_on_a_real_video(tmp_path, make_video, fmt, ext):
    raw = tmp_path / "raw"
    raw.mkdir()
    codec = {".webm": "libvpx", ".mkv": "mpeg4"}.get(ext, "libx264")
    video = make_video(raw / f"talk{ext}", VFR_TIMES, size=(128, 64), codec=codec)
    write_transcript(raw, "talk", fmt)
    out = tmp_path / "out"
    assert run_prep("--videos", raw, "--out", out, "--fps", 2, *CANVAS) == 0

    # t_sec: the first decoded frame at or after each k / fps, with its own pts
    pts = decoded_times(video)
    want = [next(t for t in pts if t >= k / 2) for k in range(7)]
    rows = utils.read_manifest(out)
    assert [r["t_sec"] for r in rows] == want
    assert [r["frame_idx"] for r in rows] == list(range(len(rows)))
    frames = utils.open_frames(out)
    for r in rows:  # the stored image is that very frame, letterboxed (bars above and below)
        level = frame_level(pts.index(r["t_sec"]))
        assert abs(int(frames[r["frame_idx"], 28, 42, 0]) - level) <= 8
        assert frames[r["frame_idx"], 0, 42].sum() == 0 and frames[r["frame_idx"], 28, 0, 0] > 200
        assert (out / r["frame_path"]).exists()

    utts = utils.read_utterances(out)
    assert [u["text"] for u in utts] == [t for _, t, _, _ in UTTS]
    assert [u["turn"] for u in utts] == [0, 1]
    for u, (speaker, text, a, b) in zip(utts, UTTS, strict=True):
        spans = utils.split_words(text)
        got = [w["t_sec"] for w in u["words"]]
        if fmt == "conversation-timestamp":
            assert u["time_source"] == "timestamp" and got == [a] * len(spans)
        elif fmt == "seamless":
            step = (b - a) / len(spans)
            assert u["time_source"] == "given"
            assert got == pytest.approx([a + (k + 0.25) * step for k in range(len(spans))])
        else:
            assert u["time_source"] == "spread" and (u["start"], u["end"]) == (a, b)
            assert got == pytest.approx([a + (b - a) * (s + e) / 2 / len(text) for s, e in spans])
        want_speaker = {"srt": "", "seamless": "talk"}.get(fmt, speaker)  # Seamless: participant
        assert u["speaker"] == want_speaker
    assert utts[1]["words"][-1] == {
        "text": "down",
        "char_start": 17,
        "char_end": 21,
        "t_sec": utts[1]["words"][-1]["t_sec"],
        "pos": utts[1]["words"][-1]["pos"],
        "content": False,
    }
    assert [w["text"] for w in utts[1]["words"] if w["content"]] == ["man", "sits"]


def test_transcripts_elsewhere_pair_by_stem_or_by_the_id_they_name(tmp_path, make_video):
    videos, texts = tmp_path / "videos", tmp_path / "texts"
    videos.mkdir()
    texts.mkdir()
    for stem in ("a", "b"):
        make_video(videos / f"{stem}.mp4", [0, 1, 2, 3])
    write_transcript(texts, "a", "srt")
    # b_notes.json has no video of its stem; its conversation_id "b" names the video
    write_transcript(texts, "b", "conversation").rename(texts / "b_notes.json")
    out = tmp_path / "out"
    assert run_prep("--videos", videos, "--transcripts", texts, "--out", out, *CANVAS) == 0
    assert {u["clip_id"] for u in utils.read_utterances(out)} == {"a", "b"}
    assert read_report(out)["clips_skipped"] == []


def test_extracted_frames_manifest(tmp_path):
    from PIL import Image

    src = tmp_path / "authors"
    (src / "frames").mkdir(parents=True)
    rows = ["split,clip_id,frame_path,t_sec"]
    for k in range(8):
        Image.new("RGB", (60, 40), (frame_level(k),) * 3).save(src / "frames" / f"f{k}.png")
        rows.append(f"test,talk,frames/f{k}.png,{k * 0.5}")
        rows.append(f"{['train', 'val'][k % 2]},mixed,frames/f{k}.png,{k * 0.5}")  # two splits
    (src / "manifest.csv").write_text("\n".join(rows) + "\n")
    write_transcript(src, "talk", "srt")
    write_transcript(src, "mixed", "srt")
    out = tmp_path / "out"
    assert run_prep("--manifest", src / "manifest.csv", "--out", out, "--fps", 1, *CANVAS) == 0
    (skip,) = read_report(out)["clips_skipped"]  # reported once, naming the manifest
    assert skip["file"] == str(src / "manifest.csv")
    assert "clip 'mixed' has split(s) ['train', 'val']" in skip["reason"]
    got = utils.read_manifest(out)
    assert [(r["split"], r["t_sec"]) for r in got] == [("test", float(t)) for t in range(4)]
    frames = utils.open_frames(out)
    assert abs(int(frames[1, 28, 42, 0]) - frame_level(2)) <= 2
    assert [u["split"] for u in utils.read_utterances(out)] == ["test", "test"]


# -------------------------------------------------------------------------------------------
# Splits
# -------------------------------------------------------------------------------------------


def test_hash_split_is_stable_and_has_the_asked_shares():
    ids = [f"clip{k}" for k in range(4000)]
    splits = [prep.hash_split(c, 0.1, 0.2) for c in ids]
    assert splits == [prep.hash_split(c, 0.1, 0.2) for c in reversed(ids)][::-1]
    share = Counter(splits)
    assert abs(share["test"] / 4000 - 0.2) < 0.03 and abs(share["val"] / 4000 - 0.1) < 0.03
    assert Counter(demo.demo_splits(ids[:40], 0.1, 0.2).values()) == {
        "train": 28,
        "test": 8,
        "val": 4,
    }
    assert set(demo.demo_splits(ids[:3], 0.1, 0.1).values()) == {"train", "val", "test"}


def test_splits_are_by_clip_and_a_split_file_wins(tmp_path, make_video, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for k in range(4):
        make_video(raw / f"c{k}.mp4", [0, 1, 2, 3])
        write_transcript(raw, f"c{k}", "srt")
    (tmp_path / "splits.csv").write_text("clip_id,split\nc0,test\nc1,val\nc2,train\nc3,train\n")
    out = tmp_path / "out"
    assert run_prep("--videos", raw, "--out", out, "--split-file", tmp_path / "splits.csv") == 0
    by_clip = {}
    for r in utils.read_manifest(out):
        by_clip.setdefault(r["clip_id"], set()).add(r["split"])
    for u in utils.read_utterances(out):
        by_clip[u["clip_id"]].add(u["split"])
    assert by_clip == {"c0": {"test"}, "c1": {"val"}, "c2": {"train"}, "c3": {"train"}}
    assert [u["clip_id"] for u in utils.read_utterances(out, split="val")] == ["c1", "c1"]
    # hash splits: each clip in exactly the split its id hashes to
    out2 = tmp_path / "out2"
    assert run_prep("--videos", raw, "--out", out2, "--val-frac", 0.3, "--test-frac", 0.3) == 0
    got = {(r["clip_id"], r["split"]) for r in utils.read_manifest(out2)}
    assert got == {(f"c{k}", prep.hash_split(f"c{k}", 0.3, 0.3)) for k in range(4)}
    (tmp_path / "bad.csv").write_text("clip_id,split\nc0,test\nc0,train\n")
    assert run_prep("--videos", raw, "--out", out, "--split-file", tmp_path / "bad.csv") == 2
    assert "bad.csv: line 3: clip 'c0' is in two splits" in capsys.readouterr().err
    assert run_prep("--videos", raw, "--out", out, "--split-file", tmp_path / "none.csv") == 2
    assert "none.csv: no such file" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------
# Bad input: each is reported with its file and reason, the good clip goes on; --strict stops
# -------------------------------------------------------------------------------------------


CUE = "1\n00:00:00,100 --> 00:00:01,000\nhello\n"


def _srt(raw: Path, body: str | bytes, name: str = "bad.srt") -> Path:
    (raw / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    return raw / name


def _conversation(raw: Path, second_turn: dict) -> Path:
    turns = [{"speaker": "A", "utterance": "The man waves.", "timestamp": 0.5}, second_turn]
    return write_json_file(raw / "bad.json", {"conversation_id": "bad", "turns": turns})


def unreadable_video(raw, mv):
    (raw / "bad.mp4").write_bytes(b"\x00garbage" * 50)
    _srt(raw, CUE)
    return raw / "bad.mp4"


def zero_length_video(raw, mv):
    (raw / "bad.mp4").write_bytes(b"")
    _srt(raw, CUE)
    return raw / "bad.mp4"


def missing_field(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    return _conversation(raw, {"speaker": "B", "timestamp": 1.0})


def wrong_type(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    return _conversation(raw, {"speaker": "B", "utterance": "hi", "timestamp": "one second"})


def wrong_type_word(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    seg = {"start": 0.1, "end": 1.0, "transcript": "hello there"}
    seg["words"] = [{"word": "hello", "start": "0.1", "end": 0.5, "score": 1.0}]
    return write_json_file(raw / "bad.json", {"id": "bad", "metadata:transcript": [seg]})


def bad_cue_line(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    return _srt(raw, CUE.replace("-->", "->"))


def times_outside_video(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    return _srt(raw, CUE + "\n2\n00:01:00,000 --> 00:01:02,000\nlate\n")


def video_without_transcript(raw, mv):
    return mv(raw / "bad.mp4", [0, 1, 2])


def transcript_without_video(raw, mv):
    return _srt(raw, CUE)


def non_utf8(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    return _srt(raw, CUE.replace("hello", "caf\xe9 au lait").encode("latin-1"))


def duplicate_videos(raw, mv):
    mv(raw / "bad.mp4", [0, 1, 2])
    _srt(raw, CUE)
    return mv(raw / "bad.mkv", [0, 1, 2], codec="mpeg4")


def duplicate_transcripts(raw, mv):
    _srt(raw, "WEBVTT\n\n00:00:00.100 --> 00:00:01.000\nhello\n", name="bad.vtt")
    _srt(raw, CUE)
    return mv(raw / "bad.mp4", [0, 1, 2])


BAD_CASES = {  # case: (writes the bad files and returns the one the report names, reason)
    "unreadable-video": (unreadable_video, "FFmpeg cannot decode it"),
    "zero-length-video": (zero_length_video, "zero-length video"),
    "missing-field": (missing_field, "turns[1].utterance: missing (expected a str)"),
    "wrong-type": (wrong_type, "turns[1].timestamp: expected a time, got str"),
    "wrong-type-word": (wrong_type_word, "transcript[0].words[0].start: expected a time, got str"),
    "bad-cue-line": (bad_cue_line, "line 2: expected a cue timing"),
    "times-outside-video": (times_outside_video, "cue 1 (line 5): time 62.000 s is outside"),
    "video-without-transcript": (video_without_transcript, "no transcript bad{.json|.srt|.vtt}"),
    "transcript-without-video": (transcript_without_video, "no video 'bad' for it"),
    "non-utf8": (non_utf8, "not UTF-8 text: byte 0xe9 at offset 35"),
    "duplicate-videos": (duplicate_videos, "duplicate clip id 'bad'"),
    "duplicate-transcripts": (duplicate_transcripts, "duplicate clip id 'bad'"),
}


def _good_and_bad(tmp_path, make_video, case) -> tuple[Path, Path, str]:
    raw = tmp_path / "raw"
    raw.mkdir()
    make_video(raw / "good.mp4", [0, 0.5, 1, 1.5, 2, 2.5, 3])
    write_transcript(raw, "good", "conversation")
    make, reason = BAD_CASES[case]
    return raw, make(raw, make_video), reason


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_reported_and_skipped(tmp_path, make_video, capsys, case):
    raw, bad_file, reason = _good_and_bad(tmp_path, make_video, case)
    out = tmp_path / "out"
    assert run_prep("--videos", raw, "--out", out, *CANVAS) == 0
    assert {r["clip_id"] for r in utils.read_manifest(out)} == {"good"}
    report = read_report(out)
    assert report["clips_done"] == ["good"]
    (entry,) = report["clips_skipped"]
    assert entry["file"] == str(bad_file) and reason in entry["reason"], entry
    message = f"{entry['file']}: {entry['reason']}"
    assert message in capsys.readouterr().err

    strict_out = tmp_path / "strict"
    assert run_prep("--videos", raw, "--out", strict_out, *CANVAS, "--strict") == 1
    assert f"prep: error: {message}" in capsys.readouterr().err
    assert not (strict_out / "manifest.csv").exists()


def test_empty_utterance_is_skipped_and_the_clip_kept(tmp_path, make_video, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_video(raw / "talk.mp4", [0, 1, 2])
    turns = [
        {"speaker": "A", "utterance": "The man waves.", "timestamp": 0.5},
        {"speaker": "B", "utterance": "  ...  ", "timestamp": 1.0},
        {"speaker": "A", "utterance": "Now he sits.", "timestamp": 1.5},
    ]
    write_json_file(raw / "talk.json", {"conversation_id": "talk", "turns": turns})
    out = tmp_path / "out"
    assert run_prep("--videos", raw, "--out", out, *CANVAS) == 0
    assert [(u["text"], u["turn"]) for u in utils.read_utterances(out)] == [
        ("The man waves.", 0),
        ("Now he sits.", 1),
    ]
    (skip,) = read_report(out)["utterances_skipped"]
    assert skip["file"] == str(raw / "talk.json") and skip["turn"] == "turns[1]"
    assert "turns[1]: empty utterance" in skip["reason"]
    assert run_prep("--videos", raw, "--out", tmp_path / "s", *CANVAS, "--strict") == 1
    assert "talk.json: turns[1]: empty utterance" in capsys.readouterr().err


def test_nothing_usable_exits_non_zero(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.mp4").write_bytes(b"")
    _srt(raw, CUE, name="a.srt")
    out = tmp_path / "out"
    assert run_prep("--videos", raw, "--out", out) == 1
    assert "nothing usable" in capsys.readouterr().err
    assert read_report(out)["clips_skipped"][0]["file"] == str(raw / "a.mp4")


# -------------------------------------------------------------------------------------------
# Resume: a run killed mid-way finishes on rerun without redoing finished clips
# -------------------------------------------------------------------------------------------


def test_killed_prep_resumes_to_the_same_outputs(tmp_path, make_video):
    raw = tmp_path / "raw"
    raw.mkdir()
    times = [k / 25 for k in range(250)]  # 10 s at 25 fps, every frame kept with --fps 25
    for k in range(4):
        make_video(raw / f"c{k}.mp4", times, size=(160, 120))
        write_transcript(raw, f"c{k}", ["conversation", "seamless", "srt", "vtt"][k])
    args = ["--videos", raw, "--fps", 25, "--height", 112, "--width", 196]
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "prep.py"), *map(str, args), "--out", str(killed)]
    proc = subprocess.Popen([*cmd, "--workers", "1"], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "frames").glob("c*/clip.json")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.parent.name for p in (killed / "frames").glob("c*/clip.json"))
    assert 1 <= len(finished) < 4, "the kill should land between the first and the last clip"
    assert not (killed / "manifest.csv").exists()
    assert all((killed / "frames" / c / "clip.json").exists() for c in finished)
    stamps = {c: os.stat(killed / "frames" / c / "clip.json").st_mtime_ns for c in finished}

    assert run_prep(*args, "--out", killed) == 0
    report = read_report(killed)
    assert report["clips_resumed"] == finished
    assert sorted(report["clips_done"] + finished) == ["c0", "c1", "c2", "c3"]
    assert stamps == {c: os.stat(killed / "frames" / c / "clip.json").st_mtime_ns for c in finished}
    assert not list((killed / "frames").glob(".tmp-*"))

    fresh = tmp_path / "fresh"
    assert run_prep(*args, "--out", fresh) == 0
    for name in ("frames.npy", "manifest.csv", "utterances.jsonl", "frames.json"):
        assert (killed / name).read_bytes() == (fresh / name).read_bytes(), name


# -------------------------------------------------------------------------------------------
# The demo set
# -------------------------------------------------------------------------------------------


def test_demo_outputs_match_the_data_contract(demo_data):
    out = demo_data
    rows = utils.read_manifest(out)
    header = (out / "manifest.csv").read_text().splitlines()[0]
    assert header == "split,clip_id,frame_idx,frame_path,t_sec"
    frames = utils.open_frames(out)
    assert frames.shape == (len(rows), 112, 196, 3) and frames.dtype == np.uint8
    assert [r["frame_idx"] for r in rows] == list(range(len(rows)))
    from PIL import Image

    for r in rows[:: max(1, len(rows) // 10)]:  # the JPEG shows the stored frame
        jpg = np.asarray(Image.open(out / r["frame_path"]), dtype=np.int16)
        assert np.abs(jpg - frames[r["frame_idx"]]).mean() < 4
    index = utils.clip_frame_index(rows)
    for _, t in index.values():  # 8 fps videos sampled at 1 fps: the frames at whole seconds
        assert t.tolist() == list(range(len(t)))

    raw = sorted(p.suffix for p in (out / "raw").iterdir() if p.suffix != ".csv")
    assert Counter(raw) == {".mp4": 8, ".json": 4, ".srt": 2, ".vtt": 2}
    with open(out / "scenes.csv", newline="") as f:
        scenes = list(csv.DictReader(f))
    assert list(scenes[0]) == ["clip_id", "start", "end", "actor", "action", "target", "people"]

    utts = utils.read_utterances(out)
    keys = ["clip_id", "split", "speaker", "text", "start", "end", "time_source", "turn", "words"]
    assert all(list(u) == keys for u in utts)
    assert len(utts) == len(scenes)
    assert Counter(u["time_source"] for u in utts).keys() == {"spread", "given"}
    split_of = {r["clip_id"]: r["split"] for r in rows}
    assert {r["clip_id"]: r["split"] for r in rows[::-1]} == split_of  # one split per clip
    assert set(split_of.values()) == {"train", "val", "test"}
    for u, scene in zip(utts, scenes, strict=True):  # utterances and events both in time order
        assert u["clip_id"] == scene["clip_id"] and u["split"] == split_of[u["clip_id"]]
        colour, kind = scene["actor"].split()
        assert colour in u["text"] and f" {kind} " in u["text"]
        content = [w for w in u["words"] if w["content"]]
        assert len(content) >= 2 and all(w["pos"] in ("NOUN", "VERB") for w in content)
        start, end = float(scene["start"]), float(scene["end"])
        ids, t = index[u["clip_id"]]
        for w in u["words"]:  # each word, and the frame nearest to it, lie inside its event
            assert u["text"][w["char_start"] : w["char_end"]] == w["text"]
            assert start <= w["t_sec"] < end
            assert start <= t[common.nearest_frame(t, w["t_sec"])] < end
    report = read_report(out)
    assert report["counts"]["utterances"] == len(utts) and not report["clips_skipped"]


def test_demo_frames_show_who_does_what():
    clip = next(c for c in map(lambda i: demo.demo_clip(i, 0), range(20)) if len(c["people"]) == 3)
    ev0, ev1 = clip["events"][:2]
    a = demo.render_demo_frame(clip, (ev0["start"] + ev0["end"]) / 2).astype(int)
    b = demo.render_demo_frame(clip, (ev1["start"] + ev1["end"]) / 2).astype(int)
    assert a.shape == (216, 384, 3)
    assert np.abs(a - b).sum(-1).astype(bool).mean() > 0.005  # another event, another picture
    for p in clip["people"]:  # everyone is visible in their colour
        assert (np.abs(a - demo.DEMO_COLOURS[p["colour"]]).sum(-1) < 10).sum() > 300


def test_demo_is_deterministic_and_resumable(demo_data, tmp_path):
    again = tmp_path / "again"
    assert prep.main([*DEMO_ARGS, "--out", str(again), "--workers", "1"]) == 0
    for name in ("frames.npy", "manifest.csv", "utterances.jsonl", "scenes.csv"):
        assert (again / name).read_bytes() == (demo_data / name).read_bytes(), name
    assert prep.main([*DEMO_ARGS, "--out", str(again), "--workers", "1"]) == 0
    assert len(read_report(again)["clips_resumed"]) == 8
    other = [demo.demo_clip(i, 1)["events"] for i in range(8)]
    assert other != [demo.demo_clip(i, 0)["events"] for i in range(8)]
