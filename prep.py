"""Stage 1: videos + time-aligned transcripts -> frames F, manifest and tagged utterances W.

The paper (§"Setup and notation") assumes frames F = {F_1, ..., F_m} extracted from the videos
and a time-aligned transcript W = {W_1, ..., W_n}; §"Local and global social tokens" POS-tags the
transcript to find its nouns and verbs and takes, for each, the temporally nearest frame. This
stage makes both, once, so that every later stage reads the same data:

  manifest.csv       split,clip_id,frame_idx,frame_path,t_sec (frame_idx = row in frames.npy)
  frames.npy/.json   uint8 [N, H, W, 3], each frame letterboxed whole into an H x W canvas
  frames/<clip_id>/  frame_XXXXX.jpg to look at (plus the clip's finished work, see below)
  utterances.jsonl   clip_id, split, speaker, text, start, end, time_source, turn, words[...]
  prep_report.json   clips done, resumed and skipped (file + reason), counts

Frames: PyAV decodes every frame; for each target time k / --fps the first decoded frame whose
presentation time is at or after it is kept (a frame serving several targets is kept once), and
t_sec is that frame's own pts time, never k / fps.

Transcripts (beside the video of the same stem, or naming it): the authors' conversation JSON
{conversation_id, turns:[{speaker, utterance, timestamp, start?, end?}]}, Seamless Interaction
JSON {id, "metadata:transcript":[{start, end, transcript, words:[{word, start, end, score}]}]},
and .srt / .vtt subtitles. Word times follow common.word_times: per-word times where given,
else the utterance's [start, end] spread over its characters, else the utterance timestamp;
`time_source` names the rule. Whole utterances are tagged with spaCy in context.

Robustness: clips are decoded and tagged in worker processes, each into frames/<clip_id>/,
written under a temporary name and renamed when complete; a rerun skips every clip whose inputs
and settings are unchanged, so a killed run resumes and never leaves a half clip. The global
files are assembled from the finished clips at the end. A bad input is reported with its file
and the reason and skipped; --strict stops at the first one instead. Exit code: 0 when usable
data was produced, 1 when nothing was (or --strict stopped), 2 for unusable arguments.

`--demo N` first synthesizes a social-interaction demo set (real mp4 files and
transcripts in all formats under OUT/raw/, scene labels in OUT/scenes.csv), then runs the
normal path on it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import (
    DEFAULT_SPACY_MODEL,
    PosTagger,
    atomic_write,
    letterbox,
    split_words,
    word_times,
    write_json,
)
from demo import make_demo

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
TRANSCRIPT_EXTS = (".json", ".srt", ".vtt")
SPLITS = ("train", "val", "test")
TIME_SLACK = 0.5  # seconds a transcript time may run past the last frame (subtitles often do)
FORMAT_VERSION = 1  # part of every clip's key: bump when the per-clip output changes


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_argument_group("inputs (one of --videos, --manifest, --demo)")
    src.add_argument("--videos", type=Path, help="folder of videos (mp4, avi, mkv, webm, mov)")
    src.add_argument(
        "--transcripts",
        type=Path,
        help="folder of transcripts (.json, .srt, .vtt); default: the videos' (or manifest's) folder",
    )
    src.add_argument(
        "--manifest",
        type=Path,
        help="frames already extracted: the authors' CSV split,clip_id,frame_path,t_sec "
        "(frame_path relative to the CSV's folder)",
    )
    src.add_argument(
        "--demo",
        type=int,
        metavar="N",
        help="synthesize N demo clips into OUT/raw/ and process them",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (the later --data)")
    p.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video")
    p.add_argument("--height", type=int, default=224, help="canvas height, a multiple of 14")
    p.add_argument("--width", type=int, default=392, help="canvas width, a multiple of 14")
    p.add_argument(
        "--pos",
        default="NOUN,VERB",
        help="comma-separated spaCy POS tags that make a word a content word (gets [SOC-L])",
    )
    p.add_argument(
        "--spacy-model", default=DEFAULT_SPACY_MODEL, help="spaCy pipeline used for POS tags"
    )
    p.add_argument(
        "--val-frac",
        type=float,
        default=0.1,
        help="share of clips in val (by a stable hash of clip_id; --demo: exact share)",
    )
    p.add_argument(
        "--test-frac",
        type=float,
        default=0.1,
        help="share of clips in test (by a stable hash of clip_id; --demo: exact share)",
    )
    p.add_argument(
        "--split-file", type=Path, help="CSV clip_id,split (train/val/test) instead of the hash"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes that decode and tag clips (1 = in this process)",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad input instead of skipping it"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the frame JPEGs")
    p.add_argument("--seed", type=int, default=0, help="seed of the --demo set")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.videos, args.manifest, args.demo)) != 1:
        p.error("give exactly one of --videos, --manifest, --demo")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % 14:
            p.error(f"--{name} {v}: must be a positive multiple of 14 (the ViT patch size)")
    if args.fps <= 0:
        p.error(f"--fps {args.fps}: must be > 0")
    if min(args.val_frac, args.test_frac) < 0 or args.val_frac + args.test_frac >= 1:
        p.error("--val-frac and --test-frac must be >= 0 and leave some clips for train")
    if args.demo is not None and args.demo < 1:
        p.error(f"--demo {args.demo}: need at least one clip")
    args.workers = max(1, args.workers)
    return args


# --------------------------------------------------------------------------------------------
# Problems: every bad input becomes one of these, named by file and field
# --------------------------------------------------------------------------------------------


class PrepError(Exception):
    """A bad input: `file` and `reason` (which names the field, turn or line)."""

    def __init__(self, file: str | Path, reason: str):
        self.file, self.reason = str(file), reason
        super().__init__(f"{file}: {reason}")


def problem(e: PrepError, clip_id: str | None = None, turn: str | None = None) -> dict:
    """A report entry for `e`."""
    entry = {"clip_id": clip_id, "file": e.file, "reason": e.reason}
    if turn is not None:
        entry["turn"] = turn
    return entry


# --------------------------------------------------------------------------------------------
# Transcripts: three formats -> utterances {speaker, text, start, end, timestamp, given, where}
# --------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is allowed); other encodings are an error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepError(
            path, f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}"
        ) from None


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


def utterance(
    path: Path,
    where: str,
    speaker: str,
    text: str,
    start: float | None = None,
    end: float | None = None,
    timestamp: float | None = None,
    given: list[tuple[str, float, float]] | None = None,
) -> dict:
    """One parsed utterance; a start must come with an end and lie before it. `where` (e.g.
    "turns[3]") names it in messages; `given` holds per-word (word, start, end) times."""
    if (start is None) != (end is None):
        raise PrepError(path, f"{where}: has one of start/end but not the other")
    if start is not None and end < start:
        raise PrepError(path, f"{where}: end {end} is before start {start}")
    if timestamp is None:
        timestamp = start
    return {
        "speaker": speaker,
        "text": text,
        "start": start,
        "end": end,
        "timestamp": timestamp,
        "given": given,
        "where": where,
    }


def parse_conversation(path: Path, obj: dict) -> tuple[str, list[dict]]:
    """The authors' conversation JSON: {conversation_id, turns:[{speaker, utterance, timestamp,
    start?, end?}]}."""
    conv_id = get_field(path, obj, "$", "conversation_id", "str")
    utts = []
    for where, turn in objects(path, obj, "$", "turns"):
        utts.append(
            utterance(
                path,
                where,
                speaker=get_field(path, turn, where, "speaker", "str"),
                text=get_field(path, turn, where, "utterance", "str"),
                timestamp=get_field(path, turn, where, "timestamp", "time"),
                start=get_field(path, turn, where, "start", "time", required=False),
                end=get_field(path, turn, where, "end", "time", required=False),
            )
        )
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
        utts.append(
            utterance(
                path,
                where,
                speaker=pid,
                text=get_field(path, seg, where, "transcript", "str"),
                start=get_field(path, seg, where, "start", "time"),
                end=get_field(path, seg, where, "end", "time"),
                given=given or None,
            )
        )
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
    utts, i, n = [], int(vtt), 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        start_line = i
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        if block[0].split(" ")[0] in ("NOTE", "STYLE", "REGION"):
            continue
        has_id = len(block) > 1 and "-->" not in block[0]  # an index or cue id comes first
        m = CUE_LINE.match(block[has_id])
        if m is None:
            raise PrepError(
                path,
                f"line {start_line + 1 + has_id}: expected a cue timing "
                "'HH:MM:SS,mmm --> HH:MM:SS,mmm'",
            )
        raw = " ".join(block[has_id + 1 :])
        voice = re.search(r"<v(?:\.[^ >]*)?\s+([^>]+)>", raw)
        words = html.unescape(re.sub(r"<[^>]*>", "", raw)).strip()
        utts.append(
            utterance(
                path,
                f"cue {n} (line {start_line + 1})",
                speaker=voice.group(1).strip() if voice else "",
                text=words,
                start=cue_seconds(m.groups()[:4]),
                end=cue_seconds(m.groups()[4:]),
            )
        )
        n += 1
    return utts


def load_transcript(path: Path) -> tuple[str | None, list[dict], list[dict]]:
    """(the clip id the file names, if any; its usable utterances; skipped utterances)."""
    text = read_text(path)
    named = None
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepError(path, f"line {e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(obj, dict) and "turns" in obj:
            named, utts = parse_conversation(path, obj)
        elif isinstance(obj, dict) and "metadata:transcript" in obj:
            named, utts = parse_seamless(path, obj)
        else:
            raise PrepError(
                path, "expected a conversation JSON ('turns') or Seamless ('metadata:transcript')"
            )
    else:
        utts = parse_subtitles(path, text)
    kept = [u for u in utts if split_words(u["text"])]
    skipped = [
        problem(PrepError(path, f"{u['where']}: empty utterance (no words)"), turn=u["where"])
        for u in utts
        if not split_words(u["text"])
    ]
    return named, kept, skipped


# --------------------------------------------------------------------------------------------
# Clips: pair videos (or listed frames) with transcripts; assign splits
# --------------------------------------------------------------------------------------------


@dataclass
class ClipJob:
    """One clip to process: its frames' source (a video, or listed frame files) and utterances."""

    clip_id: str
    split: str
    transcript: str
    utterances: list[dict]
    video: str | None = None
    frames: list[tuple[str, float]] | None = None  # (image path, t_sec) with --manifest


def hash_split(clip_id: str, val_frac: float, test_frac: float) -> str:
    """A clip's split from a stable hash of its id: the same clip always lands in the same split,
    whatever other clips are prepared with it."""
    u = int(hashlib.sha256(clip_id.encode()).hexdigest()[:12], 16) / 16**12
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def read_split_file(path: Path) -> dict[str, str]:
    """{clip_id: split} from a CSV clip_id,split; a clip listed in two splits is an error."""
    splits: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"clip_id", "split"} <= set(reader.fieldnames or []):
            raise PrepError(path, "line 1: expected the columns clip_id,split")
        for line, row in enumerate(reader, start=2):
            clip, split = row["clip_id"], row["split"]
            if split not in SPLITS:
                raise PrepError(path, f"line {line}: split {split!r} is not one of {SPLITS}")
            if splits.setdefault(clip, split) != split:
                raise PrepError(path, f"line {line}: clip {clip!r} is in two splits")
    return splits


def read_frame_manifest(path: Path) -> tuple[dict[str, list], dict[str, str], list[dict]]:
    """The authors' manifest split,clip_id,frame_path,t_sec -> ({clip: [(image, t)]},
    {clip: split}, problems); frame paths are relative to the CSV's folder."""
    frames: dict[str, list] = {}
    splits: dict[str, set] = {}
    problems = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"split", "clip_id", "frame_path", "t_sec"}
        if not need <= set(reader.fieldnames or []):
            raise PrepError(path, f"line 1: expected the columns {sorted(need)}")
        for line, row in enumerate(reader, start=2):
            try:
                t = float(row["t_sec"])
            except ValueError:
                problems.append(problem(PrepError(path, f"line {line}: t_sec is not a number")))
                continue
            frames.setdefault(row["clip_id"], []).append((str(path.parent / row["frame_path"]), t))
            splits.setdefault(row["clip_id"], set()).add(row["split"])
    one_split = {}
    for clip, s in splits.items():
        if len(s) == 1 and s <= set(SPLITS):
            one_split[clip] = s.pop()
        else:
            reason = f"clip {clip!r} has split(s) {sorted(s)}; expected one of {SPLITS}"
            problems.append(problem(PrepError(path, reason), clip))
    return frames, one_split, problems


def find_clips(args: argparse.Namespace) -> tuple[list[ClipJob], list[dict], list[dict]]:
    """Pair every video (or listed clip) with its transcript: (jobs, clip problems, skipped
    utterances). A transcript belongs to the video of the same stem, or to the one it names."""
    problems: list[dict] = []
    utt_skips: list[dict] = []
    split_of = read_split_file(args.split_file) if args.split_file else None
    if args.manifest:
        listed, manifest_splits, problems = read_frame_manifest(args.manifest)
        sources = {clip: [args.manifest] for clip in listed}
        split_of = split_of or manifest_splits
        tdir = args.transcripts or args.manifest.parent
    else:
        if not args.videos.is_dir():
            raise PrepError(args.videos, "not a folder of videos")
        sources = {}
        for v in sorted(args.videos.iterdir()):
            if v.suffix.lower() in VIDEO_EXTS:
                sources.setdefault(v.stem, []).append(v)
        tdir = args.transcripts or args.videos
    if not tdir.is_dir():
        raise PrepError(tdir, "not a folder of transcripts")
    transcripts: dict[str, list[tuple[Path, list]]] = {}
    for t in sorted(tdir.iterdir()):
        if t.suffix.lower() not in TRANSCRIPT_EXTS:
            continue
        try:
            named, utts, skipped = load_transcript(t)
        except PrepError as e:
            problems.append(problem(e, t.stem))
            transcripts.setdefault(t.stem, []).append((t, None))  # its clip is not usable
            continue
        clip = t.stem if t.stem in sources or named not in sources else named
        if clip not in sources:
            problems.append(problem(PrepError(t, f"no video {t.stem!r} for it in {tdir}"), clip))
            continue
        for s in skipped:
            s["clip_id"] = clip
        utt_skips += skipped
        transcripts.setdefault(clip, []).append((t, utts))
    jobs = []
    for clip, srcs in sorted(sources.items()):
        files = srcs + [t for t, _ in transcripts.get(clip, [])]
        if len(srcs) > 1 or len(transcripts.get(clip, [])) > 1:
            names = ", ".join(str(f) for f in files)
            problems.append(
                problem(PrepError(srcs[0], f"duplicate clip id {clip!r}: {names}"), clip)
            )
            continue
        if clip not in transcripts:
            exts = "|".join(TRANSCRIPT_EXTS)
            reason = f"no transcript {clip}{{{exts}}} in {tdir}"
            problems.append(problem(PrepError(srcs[0], reason), clip))
            continue
        tpath, utts = transcripts[clip][0]
        if utts is None:
            continue  # already reported with the transcript's own problem
        if not utts:
            problems.append(problem(PrepError(tpath, "no usable utterance"), clip))
            continue
        split = (
            hash_split(clip, args.val_frac, args.test_frac)
            if split_of is None
            else split_of.get(clip)
        )
        if split is None:
            problems.append(
                problem(PrepError(args.split_file, f"clip {clip!r} is not listed"), clip)
            )
            continue
        job = ClipJob(clip, split, str(tpath), utts)
        if args.manifest:
            job.frames = sorted(listed[clip], key=lambda f: f[1])
        else:
            job.video = str(srcs[0])
        jobs.append(job)
    return jobs, problems, utt_skips


# --------------------------------------------------------------------------------------------
# Frames: decode with PyAV, keep one frame per 1/fps by presentation time, letterbox
# --------------------------------------------------------------------------------------------


class FrameSampler:
    """Keeps, for each target time k / fps (k = 0, 1, ...), the first frame at or after it.

    Feed it frame times in presentation order; `take(t)` says whether to keep the frame at t.
    Exact rational arithmetic, so a frame exactly on a target is never missed by rounding.
    """

    def __init__(self, fps: float):
        self.fps = Fraction(str(fps))
        self.k = 0  # the next target is k / fps

    def take(self, t: Fraction) -> bool:
        if t * self.fps < self.k:
            return False
        self.k = math.floor(t * self.fps) + 1  # every target up to t is served by this frame
        return True


@dataclass
class Settings:
    """What a clip's output depends on, besides its input files."""

    out: str
    fps: float
    height: int
    width: int
    pos: tuple[str, ...]
    spacy_model: str
    jpeg_quality: int


def decode_video(path: str, s: Settings) -> tuple[list[float], list[np.ndarray], float]:
    """(t_sec of the kept frames, their letterboxed images, the video's end time in seconds)."""
    import av

    if os.path.getsize(path) == 0:
        raise PrepError(path, "zero-length video (empty file)")
    sampler, times, images, end = FrameSampler(s.fps), [], [], 0.0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise PrepError(path, "no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            default_dur = 1 / float(stream.average_rate or 25)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.pts * frame.time_base
                dur = float(frame.duration * frame.time_base) if frame.duration else default_dur
                end = max(end, float(t) + dur)
                if sampler.take(t):
                    times.append(float(t))
                    images.append(letterbox(frame.to_ndarray(format="rgb24"), s.height, s.width))
    except av.FFmpegError as e:
        raise PrepError(path, f"FFmpeg cannot decode it: {e}") from None
    if not times:
        raise PrepError(path, "zero-length video (no frame could be decoded)")
    return times, images, end


def load_listed_frames(
    frames: list[tuple[str, float]], s: Settings
) -> tuple[list[float], list[np.ndarray], float]:
    """The --manifest counterpart of decode_video: the same sampling, over the listed times."""
    from PIL import Image

    sampler, times, images = FrameSampler(s.fps), [], []
    for path, t in frames:
        if not sampler.take(Fraction(t)):
            continue
        try:
            with Image.open(path) as im:
                images.append(letterbox(np.asarray(im.convert("RGB")), s.height, s.width))
        except OSError as e:
            raise PrepError(path, f"cannot read the frame image: {e}") from None
        times.append(t)
    gaps = np.diff([t for _, t in frames])
    return times, images, frames[-1][1] + (float(np.median(gaps)) if len(gaps) else 1 / s.fps)


# --------------------------------------------------------------------------------------------
# One clip, in a worker: decode, check times, tag, write frames/<clip_id>/ atomically
# --------------------------------------------------------------------------------------------

_TAGGERS: dict[tuple, PosTagger] = {}  # one spaCy pipeline per worker process


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clip_key(job: ClipJob, s: Settings) -> str:
    """Digest of everything the clip's output depends on: inputs' bytes and settings."""
    files = [job.transcript] + ([job.video] if job.video else [p for p, _ in job.frames])
    parts = {
        "version": FORMAT_VERSION,
        "settings": [s.fps, s.height, s.width, list(s.pos), s.spacy_model, s.jpeg_quality],
        "files": [file_digest(f) if os.path.exists(f) else None for f in files],
        "times": [t for _, t in job.frames] if job.frames else None,
    }
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_times(job: ClipJob, end: float) -> None:
    """Every time of the transcript must fall inside the video (0 to end + TIME_SLACK)."""
    for u in job.utterances:
        ts = [u["start"], u["end"], u["timestamp"]] + [w[1] for w in u["given"] or []]
        late = max(t for t in ts if t is not None)
        if late > end + TIME_SLACK:
            src = job.video or "the frames listed for it"
            raise PrepError(
                job.transcript,
                f"{u['where']}: time {late:.3f} s is outside the video ({src}: 0 to {end:.3f} s)",
            )


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


def tag_utterances(job: ClipJob, s: Settings) -> list[dict]:
    """Utterances of the clip in time order, with words, POS tags and word times."""
    tagger = _TAGGERS.setdefault((s.spacy_model, s.pos), PosTagger(s.spacy_model, s.pos))
    utts = sorted(
        job.utterances, key=lambda u: u["start"] if u["start"] is not None else u["timestamp"]
    )
    out = []
    for turn, (u, words) in enumerate(
        zip(utts, tagger.tag([u["text"] for u in utts]), strict=True)
    ):
        spans = [(w["char_start"], w["char_end"]) for w in words]
        given = align_given(u["text"], spans, u["given"]) if u["given"] else None
        times, rule = word_times(spans, len(u["text"]), given, u["start"], u["end"], u["timestamp"])
        start = u["start"] if u["start"] is not None else u["timestamp"]
        end = u["end"] if u["end"] is not None else u["timestamp"]
        out.append(
            {
                "speaker": u["speaker"],
                "text": u["text"],
                "start": start,
                "end": end,
                "time_source": rule,
                "turn": turn,
                "words": [  # the field order of the data contract
                    {
                        "text": w["text"],
                        "char_start": w["char_start"],
                        "char_end": w["char_end"],
                        "t_sec": t,
                        "pos": w["pos"],
                        "content": w["content"],
                    }
                    for w, t in zip(words, times, strict=True)
                ],
            }
        )
    return out


def process_clip(job: ClipJob, s: Settings) -> dict:
    """Make frames/<clip_id>/ (JPEGs, frames.npz, clip.json) unless an identical one exists."""
    from PIL import Image

    final = Path(s.out) / "frames" / job.clip_id
    key = clip_key(job, s)
    done = final / "clip.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return {"clip_id": job.clip_id, "status": "resumed"}
    try:
        if job.video:
            times, images, end = decode_video(job.video, s)
        else:
            times, images, end = load_listed_frames(job.frames, s)
        check_times(job, end)
    except PrepError as e:
        return {"clip_id": job.clip_id, "status": "skipped", **problem(e, job.clip_id)}
    utterances = tag_utterances(job, s)
    tmp = final.parent / f".tmp-{job.clip_id}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, img in enumerate(images):
        Image.fromarray(img).save(tmp / f"frame_{k:05d}.jpg", quality=s.jpeg_quality)
    np.savez_compressed(tmp / "frames.npz", frames=np.stack(images))  # flat scenes pack well
    meta = {
        "key": key,
        "clip_id": job.clip_id,
        "source": job.video or "manifest",
        "transcript": job.transcript,
        "end_sec": end,
        "t_sec": times,
        "utterances": utterances,
    }
    (tmp / "clip.json").write_text(json.dumps(meta))  # written last: marks the clip complete
    if final.exists():
        shutil.rmtree(final)  # made with other inputs or settings
    os.rename(tmp, final)
    return {"clip_id": job.clip_id, "status": "done"}


def _run_clip(arg: tuple[ClipJob, Settings]) -> dict:
    return process_clip(*arg)


def parallel_map(pool, fn, items: list):
    """fn over items, in the worker pool when there is one (results in completion order)."""
    return pool.imap_unordered(fn, items) if pool else map(fn, items)


def run_clips(jobs: list[ClipJob], s: Settings, pool, strict: bool) -> list[dict]:
    """process_clip over all jobs; --strict stops at the first skipped clip."""
    results = []
    it = parallel_map(pool, _run_clip, [(j, s) for j in jobs])
    for r in tqdm(it, total=len(jobs), desc="prep clips", unit="clip"):
        results.append(r)
        if r["status"] == "skipped":
            if strict:
                break
            tqdm.write(f"prep: skipped {r['file']}: {r['reason']}", file=sys.stderr)
    return results


# --------------------------------------------------------------------------------------------
# Assembly: the global frame store, manifest, utterances and report from the finished clips
# --------------------------------------------------------------------------------------------


def assemble(out: Path, jobs: list[ClipJob], s: Settings) -> dict:
    """Write frames.npy/.json, manifest.csv and utterances.jsonl for `jobs` (all finished), in
    clip-id order; return counts for the report."""
    metas = [json.loads((out / "frames" / j.clip_id / "clip.json").read_text()) for j in jobs]
    total = sum(len(m["t_sec"]) for m in metas)

    def write_frames(tmp: str) -> None:
        store = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(total, s.height, s.width, 3)
        )
        row = 0
        for j in jobs:
            clip = np.load(out / "frames" / j.clip_id / "frames.npz")["frames"]
            store[row : row + len(clip)] = clip
            row += len(clip)
        store.flush()
        del store

    atomic_write(out / "frames.npy", write_frames)
    write_json(out / "frames.json", {"height": s.height, "width": s.width, "count": total})

    manifest, lines, row = [], [], 0
    counts = {"clips": len(jobs), "frames": total, "utterances": 0, "words": 0, "content_words": 0}
    counts |= {"splits": {}, "time_sources": {}, "pos": {}}
    for j, m in zip(jobs, metas, strict=True):
        for k, t in enumerate(m["t_sec"]):
            path = f"frames/{j.clip_id}/frame_{k:05d}.jpg"
            manifest.append(f"{j.split},{j.clip_id},{row},{path},{t!r}\n")
            row += 1
        for u in m["utterances"]:
            lines.append(json.dumps({"clip_id": j.clip_id, "split": j.split} | u) + "\n")
            counts["utterances"] += 1
            counts["words"] += len(u["words"])
            counts["content_words"] += sum(w["content"] for w in u["words"])
            ts = counts["time_sources"]
            ts[u["time_source"]] = ts.get(u["time_source"], 0) + 1
            for w in u["words"]:
                counts["pos"][w["pos"]] = counts["pos"].get(w["pos"], 0) + 1
        sp = counts["splits"].setdefault(j.split, {"clips": 0, "frames": 0, "utterances": 0})
        sp["clips"] += 1
        sp["frames"] += len(m["t_sec"])
        sp["utterances"] += len(m["utterances"])

    def write_lines(header: str, rows: list[str]):
        def _write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(header)
                f.writelines(rows)

        return _write

    atomic_write(
        out / "manifest.csv", write_lines("split,clip_id,frame_idx,frame_path,t_sec\n", manifest)
    )
    atomic_write(out / "utterances.jsonl", write_lines("", lines))
    return counts


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Pair inputs, process clips (resuming finished ones), assemble, report; the exit code."""
    args = get_args(argv)
    out = args.out
    (out / "frames").mkdir(parents=True, exist_ok=True)
    for stale in (out / "frames").glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    # fork the workers first, while this process runs no other thread (no progress bar yet);
    # fork where the OS has it, so workers need not import torch and spaCy again
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(args.workers) if args.workers > 1 else None
    try:
        return prepare(args, pool)
    finally:
        if pool:
            pool.terminate()
            pool.join()


def prepare(args: argparse.Namespace, pool) -> int:
    """The run behind main(): find clips, process them, assemble and report."""
    out = args.out
    if args.demo:
        make_demo(args, lambda fn, items: parallel_map(pool, fn, items))
    s = Settings(
        str(out),
        args.fps,
        args.height,
        args.width,
        tuple(p.strip() for p in args.pos.split(",") if p.strip()),
        args.spacy_model,
        args.jpeg_quality,
    )
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
    results = run_clips(jobs, s, pool, args.strict)
    status = {r["clip_id"]: r for r in results}
    failed = [
        {k: r[k] for k in ("clip_id", "file", "reason")}
        for r in results
        if r["status"] == "skipped"
    ]
    if args.strict and failed:
        print(f"prep: error: {failed[0]['file']}: {failed[0]['reason']}", file=sys.stderr)
        return 1
    finished = [j for j in jobs if status[j.clip_id]["status"] in ("done", "resumed")]
    counts = assemble(out, finished, s) if finished else {"clips": 0, "frames": 0, "utterances": 0}
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"pos": list(s.pos)},
        "clips_done": sorted(c for c, r in status.items() if r["status"] == "done"),
        "clips_resumed": sorted(c for c, r in status.items() if r["status"] == "resumed"),
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
