"""Stage 1: videos + time-aligned transcripts -> frames F, manifest and tagged utterances W.

The paper (§"Setup and notation") takes frames F = {F_1, ..., F_m} of the videos and a
time-aligned transcript W = {W_1, ..., W_n}; §"Local and global social tokens" POS-tags W for its
nouns and verbs and gives each the temporally nearest frame. This stage makes both, once:

  manifest.csv       split,clip_id,frame_idx,frame_path,t_sec (frame_idx = row in frames.npy)
  frames.npy/.json   uint8 [N, H, W, 3], each frame letterboxed whole into an H x W canvas
  frames/<clip_id>/  frame_XXXXX.jpg to look at (and the clip's finished work)
  utterances.jsonl   clip_id, split, speaker, text, start, end, time_source, turn, words[...]
  prep_report.json   clips done, resumed and skipped (file + reason), counts

Frames: per target time k / --fps, the first decoded frame at or after it; t_sec is its own
presentation time. Transcripts (beside the video of the same stem, or naming it): conversation
JSON, Seamless Interaction JSON, .srt / .vtt; word times as given, else [start, end] spread over
the characters, else the timestamp (`time_source`). Splits by clip: a stable hash of clip_id
(--demo: exact shares) or --split-file. --manifest frame paths are relative to the CSV. Clips are
made in worker processes and renamed into place when complete; a rerun skips finished ones. A bad
input is reported (file, field) and skipped; --strict stops instead. Exit code 0: usable data
made, 1: none (or --strict stopped), 2: unusable arguments. --demo N writes a demo set (mp4s,
transcripts; scene labels in OUT/scenes.csv) to OUT/raw/, then processes it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import html
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from demo import make_demo
from utils import (
    DEFAULT_SPACY_MODEL,
    MANIFEST_COLUMNS,
    PosTagger,
    atomic_write,
    letterbox,
    read_csv,
    split_words,
    word_times,
    write_json,
)

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
TRANSCRIPT_EXTS = (".json", ".srt", ".vtt")
SPLITS = ("train", "val", "test")
TIME_SLACK = 0.5  # seconds a transcript time may run past the last frame (subtitles often do)
FORMAT_VERSION = 1  # part of every clip's key: bump when the per-clip output changes
WORKERS = min(4, os.cpu_count() or 1)  # default --workers


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)  # where the clips come from
    src.add_argument("--videos", type=Path, help="folder of videos (mp4, avi, mkv, webm, mov)")
    src.add_argument("--manifest", type=Path, help="CSV split,clip_id,frame_path,t_sec of frames")
    src.add_argument("--demo", type=int, metavar="N", help="make N demo clips in OUT/raw/")
    p.add_argument("--transcripts", type=Path, help="transcripts' folder (default: the inputs')")
    p.add_argument("--out", type=Path, required=True, help="output folder (the later --data)")
    # frames
    p.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video")
    p.add_argument("--height", type=int, default=224, help="canvas height, a multiple of 14")
    p.add_argument("--width", type=int, default=392, help="canvas width, a multiple of 14")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the frame JPEGs")
    # words
    p.add_argument("--pos", default="NOUN,VERB", help="content words' POS tags, comma-separated")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="spaCy pipeline for POS tags")
    # splits, by clip
    p.add_argument("--val-frac", type=float, default=0.1, help="share of clips in val (see above)")
    p.add_argument("--test-frac", type=float, default=0.1, help="share of clips in test")
    p.add_argument("--split-file", type=Path, help="CSV clip_id,split (train/val/test), no hash")
    # running
    p.add_argument("--workers", type=int, default=WORKERS, help="processes for clips (1: this one)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input, not skip it")
    p.add_argument("--seed", type=int, default=0, help="seed of the --demo set")
    args = p.parse_args(argv)
    if min(args.height, args.width) <= 0 or args.height % 14 or args.width % 14:
        p.error(f"--height {args.height} --width {args.width}: need positive multiples of 14")
    if args.fps <= 0:
        p.error(f"--fps {args.fps}: must be > 0")
    if min(args.val_frac, args.test_frac) < 0 or args.val_frac + args.test_frac >= 1:
        p.error("--val-frac and --test-frac must be >= 0 and leave some clips for train")
    if args.demo is not None and args.demo < 1:
        p.error(f"--demo {args.demo}: need at least one clip")
    args.pos = tuple(t.strip() for t in args.pos.split(",") if t.strip())
    args.workers = max(1, args.workers)
    return args


# ============ bad input: every one is a PrepError, named by file and field ============
class PrepError(Exception):
    """A bad input: `file` and `reason` (which names the field, turn or line)."""

    def __init__(self, file: str | Path, reason: str):
        self.file, self.reason = str(file), reason
        super().__init__(f"{file}: {reason}")

    def entry(self, clip_id: str | None = None, **turn) -> dict:  # its line in the report
        return {"clip_id": clip_id, "file": self.file, "reason": self.reason, **turn}


# ============ transcripts: three formats -> utterances ============
# an utterance: {speaker, text, start, end, timestamp, given: [(word, start, end)], where}
def get_field(path: Path, obj: dict, where: str, key: str, kind: str, required: bool = True):
    """obj[key] checked against `kind` ("str", "time", "list", "number"); times are >= 0."""
    if key not in obj or obj[key] is None:
        if required:
            raise PrepError(path, f"{where}.{key}: missing (expected a {kind})")
        return None
    v = obj[key]
    is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not {"str": isinstance(v, str), "list": isinstance(v, list)}.get(kind, is_number):
        raise PrepError(path, f"{where}.{key}: expected a {kind}, got {type(v).__name__} {v!r:.40}")
    if kind == "time" and not (math.isfinite(v) and v >= 0):
        raise PrepError(path, f"{where}.{key}: expected a time >= 0 in seconds, got {v!r}")
    return v


def objects(path: Path, obj: dict, where: str, key: str, required: bool = True):
    """(where[i], item) for the list obj[key], each item checked to be a JSON object."""
    for i, item in enumerate(get_field(path, obj, where, key, "list", required) or []):
        here = f"{key}[{i}]" if where == "$" else f"{where}.{key}[{i}]"
        if not isinstance(item, dict):
            raise PrepError(path, f"{here}: expected an object, got {type(item).__name__}")
        yield here, item


def utterance(path, where, speaker, text, start, end, timestamp=None, given=None) -> dict:
    """One utterance; `where` ("turns[3]") names it in messages, `given`: [(word, start, end)]."""
    if (start is None) != (end is None):
        raise PrepError(path, f"{where}: has one of start/end but not the other")
    if start is not None and end < start:
        raise PrepError(path, f"{where}: end {end} is before start {start}")
    timestamp = start if timestamp is None else timestamp
    u = dict(speaker=speaker, text=text, start=start, end=end, timestamp=timestamp)
    return u | dict(given=given, where=where)


def parse_conversation(path: Path, obj: dict) -> tuple[str, list[dict]]:
    """The authors' conversation JSON: {conversation_id, turns:[{speaker, utterance, timestamp,
    start?, end?}]}."""
    conv_id = get_field(path, obj, "$", "conversation_id", "str")
    utts = []
    for where, turn in objects(path, obj, "$", "turns"):
        speaker = get_field(path, turn, where, "speaker", "str")
        text = get_field(path, turn, where, "utterance", "str")
        timestamp = get_field(path, turn, where, "timestamp", "time")
        start, end = (get_field(path, turn, where, k, "time", False) for k in ("start", "end"))
        utts.append(utterance(path, where, speaker, text, start, end, timestamp))
    return conv_id, utts


def parse_seamless(path: Path, obj: dict) -> tuple[str, list[dict]]:
    """Seamless Interaction per-participant JSON: {id, "metadata:transcript":[{start, end,
    transcript, words:[{word, start, end, score}]}]}; the participant id is the speaker."""
    pid = get_field(path, obj, "$", "id", "str")
    utts = []
    for where, seg in objects(path, obj, "$", "metadata:transcript"):
        given = []
        for wwhere, w in objects(path, seg, where, "words", required=False):
            ws, we = (get_field(path, w, wwhere, k, "time") for k in ("start", "end"))
            given.append((get_field(path, w, wwhere, "word", "str"), ws, we))
            get_field(path, w, wwhere, "score", "number", required=False)
        text = get_field(path, seg, where, "transcript", "str")
        start, end = (get_field(path, seg, where, k, "time") for k in ("start", "end"))
        utts.append(utterance(path, where, pid, text, start, end, given=given or None))
    return pid, utts


CUE_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})"
CUE_LINE = re.compile(rf"^\s*{CUE_TIME}\s*-->\s*{CUE_TIME}")


def cue_seconds(groups: tuple) -> float:
    h, m, s, ms = groups
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def parse_subtitles(path: Path, text: str) -> list[dict]:
    """.srt / .vtt cues: [index or id], 'start --> end', text lines; VTT voice tags <v Name>
    give the speaker, other markup is dropped."""
    lines = text.splitlines()
    vtt = path.suffix.lower() == ".vtt"
    if vtt and not (lines and lines[0].startswith("WEBVTT")):
        raise PrepError(path, "line 1: expected 'WEBVTT' (a WebVTT header)")
    utts = []
    for blank, run in itertools.groupby(enumerate(lines), key=lambda il: not il[1].strip()):
        nums, block = zip(*run, strict=True)  # a block: the lines between blank ones
        first = nums[0]
        if blank or (vtt and first == 0) or block[0].split(" ")[0] in ("NOTE", "STYLE", "REGION"):
            continue  # the WebVTT header, comments and styles are no cues
        has_id = len(block) > 1 and "-->" not in block[0]  # an index or cue id comes first
        m = CUE_LINE.match(block[has_id])
        if m is None:
            reason = "expected a cue timing 'HH:MM:SS,mmm --> HH:MM:SS,mmm'"
            raise PrepError(path, f"line {first + 1 + has_id}: {reason}")
        raw = " ".join(block[has_id + 1 :])
        voice = re.search(r"<v(?:\.[^ >]*)?\s+([^>]+)>", raw)
        speaker = voice.group(1).strip() if voice else ""
        words = html.unescape(re.sub(r"<[^>]*>", "", raw)).strip()
        start, end = cue_seconds(m.groups()[:4]), cue_seconds(m.groups()[4:])
        where = f"cue {len(utts)} (line {first + 1})"
        utts.append(utterance(path, where, speaker, words, start, end))
    return utts


def load_transcript(path: Path) -> tuple[str | None, list[dict], list[dict]]:
    """(the clip id the file names, if any; its usable utterances; skipped utterances). Text is
    UTF-8 (a BOM is allowed)."""
    data, named = path.read_bytes(), None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        reason = f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}"
        raise PrepError(path, reason) from None
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepError(path, f"line {e.lineno}: invalid JSON ({e.msg})") from None
        if not (isinstance(obj, dict) and ("turns" in obj or "metadata:transcript" in obj)):
            reason = "expected a conversation JSON ('turns') or Seamless ('metadata:transcript')"
            raise PrepError(path, reason)
        named, utts = (parse_conversation if "turns" in obj else parse_seamless)(path, obj)
    else:
        utts = parse_subtitles(path, text)
    empty = [u["where"] for u in utts if not split_words(u["text"])]
    skipped = [PrepError(path, f"{w}: empty utterance (no words)").entry(turn=w) for w in empty]
    return named, [u for u in utts if u["where"] not in empty], skipped


# ============ clips: videos (or listed frames) paired with transcripts, a split each ============
# a clip (job): {clip_id, split, transcript, utterances, video, frames: [(image, t_sec)] | None}
def hash_split(clip_id: str, val_frac: float, test_frac: float) -> str:
    """A clip's split from a stable hash of its id, whatever other clips are prepared with it."""
    u = int(hashlib.sha256(clip_id.encode()).hexdigest()[:12], 16) / 16**12
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def read_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """utils.read_csv, its errors (no file, a column missing) as PrepError."""
    try:
        return read_csv(path, columns)
    except (OSError, ValueError) as e:
        raise PrepError(path, str(e).removeprefix(f"{path}: ")) from None


def read_split_file(path: Path) -> dict[str, str]:
    """{clip_id: split} from a CSV clip_id,split; a clip listed in two splits is an error."""
    splits: dict[str, str] = {}
    for line, row in read_rows(path, ("clip_id", "split")):
        clip, split = row["clip_id"], row["split"]
        if split not in SPLITS:
            raise PrepError(path, f"line {line}: split {split!r} is not one of {SPLITS}")
        if splits.setdefault(clip, split) != split:
            raise PrepError(path, f"line {line}: clip {clip!r} is in two splits")
    return splits


def read_frame_manifest(path: Path) -> tuple[dict[str, list], dict[str, str], list[dict]]:
    """The authors' manifest split,clip_id,frame_path,t_sec -> ({clip: [(image, t)]},
    {clip: split}, problems); frame paths are relative to the CSV's folder."""
    frames, splits, problems = {}, {}, []
    for line, row in read_rows(path, ("split", "clip_id", "frame_path", "t_sec")):
        try:
            t = float(row["t_sec"])
        except ValueError:
            problems.append(PrepError(path, f"line {line}: t_sec is not a number").entry())
            continue
        frames.setdefault(row["clip_id"], []).append((str(path.parent / row["frame_path"]), t))
        splits.setdefault(row["clip_id"], set()).add(row["split"])
    one_split = {clip: min(s) for clip, s in splits.items() if len(s) == 1 and s <= set(SPLITS)}
    for clip in (c for c in splits if c not in one_split):
        reason = f"clip {clip!r} has split(s) {sorted(splits[clip])}; expected one of {SPLITS}"
        problems.append(PrepError(path, reason).entry(clip))
    return frames, one_split, problems


def read_transcripts(tdir: Path, sources: dict) -> tuple[dict, list[dict], list[dict]]:
    """{clip: [(transcript, utterances, or None when unreadable)]}, problems, skipped utterances.
    A transcript belongs to the video of its stem, or else to the one it names."""
    if not tdir.is_dir():
        raise PrepError(tdir, "not a folder of transcripts")
    found, problems, utt_skips = {}, [], []
    for t in sorted(t for t in tdir.iterdir() if t.suffix.lower() in TRANSCRIPT_EXTS):
        try:
            named, utts, skipped = load_transcript(t)
        except PrepError as e:
            problems.append(e.entry(t.stem))
            found.setdefault(t.stem, []).append((t, None))  # its clip is not usable
            continue
        clip = t.stem if t.stem in sources or named not in sources else named
        if clip not in sources:
            problems.append(PrepError(t, f"no video {t.stem!r} for it in {tdir}").entry(clip))
            continue
        utt_skips += [s | {"clip_id": clip} for s in skipped]
        found.setdefault(clip, []).append((t, utts))
    return found, problems, utt_skips


def find_clips(args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict]]:
    """Each video (or listed clip) with its transcript and split: (jobs, problems, skipped
    utterances)."""
    split_of = read_split_file(args.split_file) if args.split_file else None
    if args.manifest:
        listed, listed_splits, problems = read_frame_manifest(args.manifest)
        sources = {clip: [args.manifest] for clip in listed}
        split_of, tdir = split_of or listed_splits, args.transcripts or args.manifest.parent
    else:
        if not args.videos.is_dir():
            raise PrepError(args.videos, "not a folder of videos")
        sources, problems, tdir = {}, [], args.transcripts or args.videos
        for v in sorted(v for v in args.videos.iterdir() if v.suffix.lower() in VIDEO_EXTS):
            sources.setdefault(v.stem, []).append(v)
    transcripts, more, utt_skips = read_transcripts(tdir, sources)
    problems += more
    jobs = []
    for clip, srcs in sorted(sources.items()):
        found = transcripts.get(clip, [])
        tpath, utts = found[0] if found else (None, None)
        if len(srcs) > 1 or len(found) > 1:
            names = ", ".join(str(f) for f in srcs + [t for t, _ in found])
            why = PrepError(srcs[0], f"duplicate clip id {clip!r}: {names}")
        elif not found:
            exts = "|".join(TRANSCRIPT_EXTS)
            why = PrepError(srcs[0], f"no transcript {clip}{{{exts}}} in {tdir}")
        elif utts is None:
            continue  # already reported with the transcript's own problem
        elif not utts:
            why = PrepError(tpath, "no usable utterance")
        elif split_of is not None and clip not in split_of:
            if not args.split_file:
                continue  # a --manifest clip without one split: already reported
            why = PrepError(args.split_file, f"clip {clip!r} is not listed")
        else:
            fracs = (args.val_frac, args.test_frac)
            split = hash_split(clip, *fracs) if split_of is None else split_of[clip]
            video = None if args.manifest else str(srcs[0])
            frames = sorted(listed[clip], key=lambda f: f[1]) if args.manifest else None
            job = dict(clip_id=clip, split=split, transcript=str(tpath), utterances=utts)
            jobs.append(job | dict(video=video, frames=frames))
            continue
        problems.append(why.entry(clip))
    return jobs, problems, utt_skips


# ============ frames: decode, sample by presentation time, letterbox ============
def sample(frames, fps: float):
    """The first of `frames` ((t, x) pairs in presentation order, t a Fraction) at or after each
    target time k / fps, k = 0, 1, ...; exact rationals, so a frame on a target is never missed."""
    fps, k = Fraction(str(fps)), 0  # the next target is k / fps
    for t, x in frames:
        if t * fps >= k:
            k = math.floor(t * fps) + 1  # every target up to t is served by this frame
            yield t, x


def decode_video(path: str, args) -> tuple[list[float], list[np.ndarray], float]:
    """(t_sec of the kept frames, their letterboxed images, the video's end time in seconds)."""
    if os.path.getsize(path) == 0:
        raise PrepError(path, "zero-length video (empty file)")
    times, images, end = [], [], 0.0

    def timed(container, stream):  # every frame with its pts time, extending the video's end
        nonlocal end
        default_dur = 1 / float(stream.average_rate or 25)
        for frame in container.decode(stream):
            if frame.pts is not None:
                t = frame.pts * frame.time_base
                dur = float(frame.duration * frame.time_base) if frame.duration else default_dur
                end = max(end, float(t) + dur)
                yield t, frame

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise PrepError(path, "no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for t, frame in sample(timed(container, stream), args.fps):
                times.append(float(t))
                images.append(letterbox(frame.to_ndarray(format="rgb24"), args.height, args.width))
    except av.FFmpegError as e:
        raise PrepError(path, f"FFmpeg cannot decode it: {e}") from None
    if not times:
        raise PrepError(path, "zero-length video (no frame could be decoded)")
    return times, images, end


def load_listed_frames(frames: list, args) -> tuple[list[float], list[np.ndarray], float]:
    """The --manifest counterpart of decode_video: the same sampling, over the listed times."""
    times, images = [], []
    for t, path in sample(((Fraction(t), path) for path, t in frames), args.fps):
        try:
            with Image.open(path) as im:
                images.append(letterbox(np.asarray(im.convert("RGB")), args.height, args.width))
        except OSError as e:
            raise PrepError(path, f"cannot read the frame image: {e}") from None
        times.append(float(t))  # exact: a float's Fraction converts back to the same float
    gaps = np.diff([t for _, t in frames])
    return times, images, frames[-1][1] + (float(np.median(gaps)) if len(gaps) else 1 / args.fps)


# ============ one clip, in a worker: decode, check times, tag, write frames/<clip_id>/ ============
tagger = functools.cache(PosTagger)  # one spaCy pipeline per worker process


def file_digest(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def clip_key(job: dict, args) -> str:
    """Digest of everything the clip's output depends on: inputs' bytes and settings."""
    frames = job["frames"] or []
    files = [job["transcript"]] + ([job["video"]] if job["video"] else [p for p, _ in frames])
    s = [args.fps, args.height, args.width, list(args.pos), args.spacy_model, args.jpeg_quality]
    parts = {"version": FORMAT_VERSION, "settings": s, "files": [file_digest(f) for f in files]}
    parts["times"] = [t for _, t in frames] if frames else None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_times(job: dict, end: float) -> None:
    """Every time of the transcript must fall inside the video (0 to end + TIME_SLACK)."""
    for u in job["utterances"]:
        ts = [u["start"], u["end"], u["timestamp"]] + [w[1] for w in u["given"] or []]
        late = max(t for t in ts if t is not None)
        if late > end + TIME_SLACK:
            src = job["video"] or "the frames listed for it"
            reason = f"time {late:.3f} s is outside the video ({src}: 0 to {end:.3f} s)"
            raise PrepError(job["transcript"], f"{u['where']}: {reason}")


def align_given(text: str, spans: list[tuple[int, int]], given: list) -> list[float | None]:
    """Per word of `spans`, the mid time of the first given word found over it, in order."""
    times: list[float | None] = [None] * len(spans)
    cursor = 0
    for word, ws, we in given:
        w = word.strip()
        pos = text.find(w, cursor) if w else -1
        if pos < 0:
            continue
        cursor = pos + len(w)
        for j, (a, b) in enumerate(spans):
            if a < cursor and b > pos and times[j] is None:
                times[j] = (ws + we) / 2
    return times


def tag_utterances(job: dict, args) -> list[dict]:
    """Utterances of the clip in time order, with words, POS tags and word times."""
    utts = sorted(
        job["utterances"], key=lambda u: u["timestamp"] if u["start"] is None else u["start"]
    )
    tagged = tagger(args.spacy_model, args.pos).tag([u["text"] for u in utts])  # in context
    out = []
    for turn, (u, words) in enumerate(zip(utts, tagged, strict=True)):
        spans = [(w["char_start"], w["char_end"]) for w in words]
        given = align_given(u["text"], spans, u["given"]) if u["given"] else None
        times, rule = word_times(spans, len(u["text"]), given, u["start"], u["end"], u["timestamp"])
        start, end = (u["timestamp"] if u[k] is None else u[k] for k in ("start", "end"))
        words = [  # the field order of the data contract
            {k: w[k] for k in ("text", "char_start", "char_end")}
            | {"t_sec": t, "pos": w["pos"], "content": w["content"]}
            for w, t in zip(words, times, strict=True)
        ]
        u = {"speaker": u["speaker"], "text": u["text"], "start": start, "end": end}
        out.append(u | {"time_source": rule, "turn": turn, "words": words})
    return out


def process_clip(job: dict, args) -> dict:
    """Make frames/<clip_id>/ (JPEGs, frames.npz, clip.json) unless an identical one exists."""
    clip_id, key = job["clip_id"], clip_key(job, args)
    final = args.out / "frames" / clip_id
    tmp = final.parent / f".tmp-{clip_id}-{os.getpid()}"  # renamed to final when complete
    done = final / "clip.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return {"clip_id": clip_id, "status": "resumed"}
    try:
        if job["video"]:
            times, images, end = decode_video(job["video"], args)
        else:
            times, images, end = load_listed_frames(job["frames"], args)
        check_times(job, end)
    except PrepError as e:
        return {"clip_id": clip_id, "status": "skipped", **e.entry(clip_id)}
    utterances = tag_utterances(job, args)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, img in enumerate(images):
        Image.fromarray(img).save(tmp / f"frame_{k:05d}.jpg", quality=args.jpeg_quality)
    np.savez_compressed(tmp / "frames.npz", frames=np.stack(images))  # flat scenes pack well
    meta = dict(key=key, clip_id=clip_id, source=job["video"] or "manifest")
    meta |= dict(transcript=job["transcript"], end_sec=end, t_sec=times, utterances=utterances)
    (tmp / "clip.json").write_text(json.dumps(meta))  # written last: marks the clip complete
    if final.exists():
        shutil.rmtree(final)  # made with other inputs or settings
    os.rename(tmp, final)
    return {"clip_id": clip_id, "status": "done"}


# ============ assemble: frame store, manifest and utterances from the finished clips ============
def assemble(out: Path, jobs: list[dict], args) -> dict:
    """Write frames.npy/.json, manifest.csv and utterances.jsonl for `jobs` (all finished), in
    clip-id order; return counts for the report."""
    metas = [json.loads((out / "frames" / j["clip_id"] / "clip.json").read_text()) for j in jobs]
    total = sum(len(m["t_sec"]) for m in metas)

    def write_frames(tmp: str) -> None:
        shape = (total, args.height, args.width, 3)
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        row = 0
        for j in jobs:
            clip = np.load(out / "frames" / j["clip_id"] / "frames.npz")["frames"]
            store[row : row + len(clip)] = clip
            row += len(clip)
        del store  # flushed to disk

    atomic_write(out / "frames.npy", write_frames)
    write_json(out / "frames.json", {"height": args.height, "width": args.width, "count": total})

    manifest, lines, splits, row = [",".join(MANIFEST_COLUMNS) + "\n"], [], {}, 0
    for j, m in zip(jobs, metas, strict=True):
        clip, split = j["clip_id"], j["split"]
        for k, t in enumerate(m["t_sec"]):
            manifest.append(f"{split},{clip},{row},frames/{clip}/frame_{k:05d}.jpg,{t!r}\n")
            row += 1
        lines += [json.dumps({"clip_id": clip, "split": split} | u) + "\n" for u in m["utterances"]]
        n = splits.setdefault(split, Counter())
        n.update(clips=1, frames=len(m["t_sec"]), utterances=len(m["utterances"]))
    for name, rows in (("manifest.csv", manifest), ("utterances.jsonl", lines)):
        text = "".join(rows)
        atomic_write(out / name, lambda tmp, t=text: Path(tmp).write_text(t, "utf-8", newline=""))
    utts = [u for m in metas for u in m["utterances"]]
    words = [w for u in utts for w in u["words"]]
    counts = dict(clips=len(jobs), frames=total, utterances=len(utts), words=len(words))
    counts["content_words"] = sum(w["content"] for w in words)
    counts["splits"], counts["time_sources"] = splits, Counter(u["time_source"] for u in utts)
    return counts | {"pos": Counter(w["pos"] for w in words)}


# ============ main ============
def main(argv: list[str] | None = None) -> int:
    """Pair inputs, process clips (resuming finished ones), assemble, report; the exit code."""
    args = get_args(argv)
    out = args.out
    (out / "frames").mkdir(parents=True, exist_ok=True)
    for stale in (out / "frames").glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    # fork (where the OS can) before any thread starts: workers need not import spaCy again
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(args.workers) if args.workers > 1 else contextlib.nullcontext() as pool:
        imap = pool.imap_unordered if pool else map  # results in completion order

        # ============ the demo set: real videos and transcripts in OUT/raw/ ============
        if args.demo:
            make_demo(args, imap)

        # ============ clips: inputs paired, bad ones reported ============
        try:
            jobs, problems, utt_skips = find_clips(args)
        except PrepError as e:
            print(f"prep: error: {e}", file=sys.stderr)
            return 2
        for p in problems + utt_skips:
            if args.strict:
                print(f"prep: error: {p['file']}: {p['reason']}", file=sys.stderr)
                return 1
            print(f"prep: skipped {p['file']}: {p['reason']}", file=sys.stderr)

        # ============ each clip in a worker (a finished one is resumed) ============
        status, failed = {}, []
        results = imap(functools.partial(process_clip, args=args), jobs)
        for r in tqdm(results, total=len(jobs), desc="prep clips", unit="clip"):
            status[r["clip_id"]] = r["status"]
            if r["status"] == "skipped":
                failed.append({k: r[k] for k in ("clip_id", "file", "reason")})
                if args.strict:
                    print(f"prep: error: {r['file']}: {r['reason']}", file=sys.stderr)
                    return 1
                tqdm.write(f"prep: skipped {r['file']}: {r['reason']}", file=sys.stderr)

    # ============ assemble and report ============
    finished = [j for j in jobs if status[j["clip_id"]] != "skipped"]
    counts = assemble(out, finished, args) if finished else dict(clips=0, frames=0, utterances=0)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "clips_done": sorted(c for c, s in status.items() if s == "done"),
        "clips_resumed": sorted(c for c, s in status.items() if s == "resumed"),
        "clips_skipped": sorted(problems + failed, key=lambda p: (str(p["clip_id"]), p["file"])),
        "utterances_skipped": utt_skips,
        "counts": counts,
    }
    write_json(out / "prep_report.json", json.loads(json.dumps(report, default=str)))
    if not counts["utterances"]:
        print(f"prep: nothing usable was produced; see {out / 'prep_report.json'}", file=sys.stderr)
        return 1
    print(
        f"prep: {counts['clips']} clips, {counts['frames']} frames, {counts['utterances']} "
        f"utterances -> {out} ({len(report['clips_skipped'])} clips skipped, "
        f"{len(utt_skips)} utterances skipped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
