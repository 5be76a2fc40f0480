"""The demo set of `prep.py --demo N`: synthetic videos of people doing social actions to each
other, with transcripts that say who does what to whom.

Real H.264 mp4 files written with PyAV, and transcripts in the three formats prep.py reads, in
turn; prep.py then processes them by its normal path. 2-3 people per clip (six colours, women and
men) at fixed places, 3-5 events per clip; in each event one person acts on another (waves at,
hugs, shakes hands with, points at, turns away from, laughs at, argues with) or alone (cries, sits
down, jumps), and one utterance, spoken inside the event, says so. The actors, actions and
targets are predictable from the frame nearest each word, not from the text. Deterministic given
the seed. OUT/scenes.csv keeps the scene labels (scene_labels reads them back).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils import atomic_write, read_csv

# ============ the demo set: people doing social actions to each other, and what is said =========

DEMO_SIZE = (384, 216)  # width, height of the synthetic videos
DEMO_FPS = 8
# "orange" is no colour here: spaCy tags "orange man" as a proper noun, losing a content word.
DEMO_COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 90, 215),
    "green": (40, 160, 70),
    "yellow": (235, 205, 30),
    "purple": (135, 65, 190),
    "pink": (245, 135, 190),
}
DEMO_KINDS = ("woman", "man")
# action: (present tense, progressive, takes a target)
DEMO_ACTIONS = {
    "wave": ("waves at", "waving at", True),
    "hug": ("hugs", "hugging", True),
    "shake": ("shakes hands with", "shaking hands with", True),
    "point": ("points at", "pointing at", True),
    "turn": ("turns away from", "turning away from", True),
    "laugh": ("laughs at", "laughing at", True),
    "argue": ("argues with", "arguing with", True),
    "cry": ("cries", "crying", False),
    "sit": ("sits down", "sitting down", False),
    "jump": ("jumps", "jumping", False),
}
DEMO_TEMPLATES = (
    "The {actor} {does}{target}.",
    "Now the {actor} {does}{target}.",
    "Look, the {actor} is {doing}{target}.",
)
DEMO_SLOTS = (80, 192, 304)  # x of the left, middle and right places
SKIN, HAIR, TROUSERS, INK = (238, 200, 165), (75, 50, 30), (70, 70, 80), (20, 20, 20)


PERSON = re.compile(rf"\b({'|'.join(DEMO_COLOURS)})\s+({'|'.join(DEMO_KINDS)})\b")
VERB_FORMS = {
    f.split()[0]: a for a, (does, doing, _) in DEMO_ACTIONS.items() for f in (does, doing)
}
VERB = re.compile(rf"\b({'|'.join(VERB_FORMS)})\b")


def parse_demo_text(text: str) -> dict[str, str | None]:
    """{actor, action, target} of the first sentence of `text` in the demo's vocabulary (as in
    scenes.csv): action the DEMO_ACTIONS key of the first verb form ("waves", "shaking" ...),
    actor the last "colour kind" named before it, target the first named after it (none for an
    action without target); without an action, actor the first person named. None: not found."""
    s = re.split(r"[.!?\n]", text.lower(), maxsplit=1)[0]
    people = [(m.start(), " ".join(m.groups())) for m in PERSON.finditer(s)]
    verb = VERB.search(s)
    if verb is None:
        return {"actor": people[0][1] if people else None, "action": None, "target": None}
    action = VERB_FORMS[verb.group(1)]
    before = [p for at, p in people if at < verb.start()]
    after = [p for at, p in people if at > verb.start()] if DEMO_ACTIONS[action][2] else []
    return {
        "actor": before[-1] if before else None,
        "action": action,
        "target": next(iter(after), None),
    }


SCENE_SLOTS = ("actor", "action", "target")  # who does what to whom: scenes.csv's columns


def scene_labels(path: Path, rows: list[dict]) -> list[dict | None]:
    """The scene (scenes.csv: actor, action, target) at each row's clip_id and t_sec, or None."""
    spans: dict[str, list] = {}
    for _, s in read_csv(path, ("clip_id", "start", "end", *SCENE_SLOTS)):
        spans.setdefault(s["clip_id"], []).append((float(s["start"]), float(s["end"]), s))
    return [
        next((s for a, b, s in spans.get(r["clip_id"], []) if a <= r["t_sec"] < b), None)
        for r in rows
    ]


def demo_clip(i: int, seed: int) -> dict:
    """Who is in clip i and what happens: 3-5 events of 2.5-3 s, each an actor doing an action
    (to a target), with one utterance about it spoken inside the event."""
    rng = np.random.default_rng([seed, i])
    n = int(rng.integers(2, 4))
    colours = [list(DEMO_COLOURS)[c] for c in rng.choice(len(DEMO_COLOURS), n, replace=False)]
    people = [
        {"name": f"{c} {DEMO_KINDS[int(rng.integers(2))]}", "colour": c, "x": x}
        for c, x in zip(colours, sorted(rng.choice(3, n, replace=False)), strict=True)
    ]
    for p in people:
        p["x"] = DEMO_SLOTS[p["x"]]
    events, t, prev = [], 0.0, None
    for _ in range(int(rng.integers(3, 6))):
        dur = 2.5 + 0.125 * int(rng.integers(0, 5))
        while True:
            action = list(DEMO_ACTIONS)[int(rng.integers(len(DEMO_ACTIONS)))]
            actor = int(rng.integers(n))
            others = [k for k in range(n) if k != actor]
            target = others[int(rng.integers(len(others)))] if DEMO_ACTIONS[action][2] else None
            if (action, actor, target) != prev:
                break
        prev = (action, actor, target)
        does, doing, _ = DEMO_ACTIONS[action]
        text = DEMO_TEMPLATES[int(rng.integers(len(DEMO_TEMPLATES)))].format(
            actor=people[actor]["name"],
            does=does,
            doing=doing,
            target="" if target is None else f" the {people[target]['name']}",
        )
        # spoken well inside the event, so even the nearest frame at 1 fps shows this event
        u0 = math.ceil((t + 0.55 + 0.25 * rng.random()) * 1000) / 1000
        u1 = math.floor((t + dur - 0.55 - 0.25 * rng.random()) * 1000) / 1000
        events.append(
            {"start": t, "end": t + dur, "action": action, "actor": actor, "target": target}
            | {"text": text, "u_start": u0, "u_end": u1}
        )
        t += dur
    return {"clip_id": f"demo_{i:04d}", "people": people, "events": events, "duration": t}


def demo_poses(clip: dict, ev: dict, t: float) -> list[dict]:
    """How each person stands at time t of event `ev`: place, arms (side: (angle, length), angle 0
    hanging, 90 sideways, 180 up), mouth, gaze; the actor acts, the target faces the actor."""
    people, a, tg = clip["people"], ev["actor"], ev["target"]
    phase = 2 * math.pi * t
    poses = [
        {"x": p["x"] + 2 * math.sin(0.5 * phase + k), "mouth": "line"} for k, p in enumerate(people)
    ]
    side = 0 if tg is None else (1 if people[tg]["x"] > people[a]["x"] else -1)
    pa = poses[a]
    pa |= {"mouth": "smile", "look": side, "side": side}
    if tg is not None:
        poses[tg]["look"] = -side
    act = ev["action"]
    if act == "wave":
        pa["arms"] = {side: (150 + 25 * math.sin(4 * phase), 36)}
    elif act == "hug":  # bodies together, arms around
        pa["x"] = people[tg]["x"] - side * 26
        pa["arms"] = {side: (95, 44)}
        poses[tg]["arms"] = {-side: (95, 30)}
    elif act == "shake":  # arms meet between them
        pa["x"] = people[tg]["x"] - side * 62
        swing = 10 * math.sin(4 * phase)
        pa["arms"] = {side: (80 + swing, 36)}
        poses[tg]["arms"] = {-side: (80 + swing, 36)}
    elif act == "point":
        pa |= {"arms": {side: (90, 58)}, "mouth": "line"}
    elif act == "turn":  # seen from the back: no face
        pa |= {"back": True, "x": people[a]["x"] - side * 14}
    elif act == "laugh":
        pa |= {"mouth": "open", "head_down": -3, "arms": {-1: (35, 30), 1: (35, 30)}}
    elif act == "cry":
        pa |= {"mouth": "frown", "head_down": 7, "arms": {-1: (8, 36), 1: (8, 36)}}
    elif act == "argue":  # both shout with raised arms
        for k, lean in ((a, 0), (tg, 8)):
            swing = 10 * math.sin(5 * phase)
            poses[k] |= {"arms": {-1: (155 + lean + swing, 36), 1: (155 + lean - swing, 36)}}
            poses[k]["mouth"] = "shout"
    elif act == "sit":
        pa |= {"sit": True, "x": people[a]["x"], "arms": {-1: (25, 34), 1: (25, 34)}}
    elif act == "jump":
        pa |= {"lift": 28 + 14 * abs(math.sin(1.5 * phase)), "legs_apart": True}
        pa["arms"] = {-1: (165, 36), 1: (165, 36)}
    return poses


def draw_person(d, person: dict, pose: dict) -> dict:
    """One person (woman: dress and long hair; man: shirt, trousers, short hair); returns the
    head centre and hands, where props attach."""
    colour, woman = DEMO_COLOURS[person["colour"]], person["name"].endswith("woman")
    x, ground, lift = pose["x"], 200, pose.get("lift", 0)
    hip = ground - 36 - lift - (22 if pose.get("sit") else 0)
    shoulder = hip - 46
    hy = shoulder - 20 + pose.get("head_down", 0)
    leg_colour, leg_width = (SKIN, 6) if woman else (TROUSERS, 9)
    for dx in (-7, 7):
        if pose.get("sit"):  # thighs forward on the seat, shins down
            knee = (x + dx + 22, hip)
            d.line([(x + dx, hip), knee, (knee[0], ground)], fill=leg_colour, width=leg_width)
        else:
            spread = (12 if dx > 0 else -12) if pose.get("legs_apart") else 0
            top = hip + (8 if woman else 0)
            d.line(
                [(x + dx, top), (x + dx + spread, ground - lift)], fill=leg_colour, width=leg_width
            )
    if woman:
        d.polygon(
            [(x - 9, shoulder), (x + 9, shoulder), (x + 25, hip + 10), (x - 25, hip + 10)],
            fill=colour,
        )
        d.rectangle([x - 17, hy - 12, x + 17, hy + 24], fill=HAIR)
    else:
        d.rectangle([x - 15, shoulder, x + 15, hip], fill=colour)
    hands = {}
    for side in (-1, 1):
        angle, length = pose.get("arms", {}).get(side, (12, 36))
        sx, sy = x + side * 12, shoulder + 5
        a = math.radians(angle)
        hand = (sx + side * length * math.sin(a), sy + length * math.cos(a))
        d.line([(sx, sy), hand], fill=colour, width=7)
        d.ellipse([hand[0] - 4, hand[1] - 4, hand[0] + 4, hand[1] + 4], fill=SKIN)
        hands[side] = hand
    d.ellipse([x - 15, hy - 15, x + 15, hy + 15], fill=HAIR if pose.get("back") else SKIN)
    if not pose.get("back"):
        if not woman:
            d.chord([x - 15, hy - 15, x + 15, hy + 15], 190, 350, fill=HAIR)
        look = pose.get("look", 0) * 3
        for ex in (-5, 5):
            d.ellipse([x + ex + look - 2, hy - 4, x + ex + look + 2, hy], fill=INK)
        mouth = pose["mouth"]
        if mouth == "open":
            d.ellipse([x - 7, hy + 2, x + 7, hy + 13], fill=INK)
        elif mouth == "shout":
            d.ellipse([x - 4, hy + 4, x + 4, hy + 11], fill=INK)
        elif mouth == "frown":
            d.arc([x - 6, hy + 6, x + 6, hy + 14], 200, 340, fill=INK, width=2)
        elif mouth == "smile":
            d.arc([x - 6, hy, x + 6, hy + 9], 20, 160, fill=INK, width=2)
        else:
            d.line([(x - 5, hy + 7), (x + 5, hy + 7)], fill=INK, width=2)
    return {"head": (x, hy), "hands": hands}


def render_demo_frame(clip: dict, t: float) -> np.ndarray:
    """The scene at time t (uint8 [h, w, 3]): everyone at their place, the event of t acted out,
    with its props (chair, tears, heart, motion marks, a jagged shout between arguers)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", DEMO_SIZE, (232, 228, 218))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 200, DEMO_SIZE[0], DEMO_SIZE[1]], fill=(196, 182, 160))  # floor
    ev = next(e for e in clip["events"] if t < e["end"])
    poses = demo_poses(clip, ev, t)
    a, tg, act = ev["actor"], ev["target"], ev["action"]
    side, ax = poses[a]["side"], poses[a]["x"]
    if act == "sit":
        wood = (120, 80, 40)
        d.rectangle([ax - 20, 160, ax + 26, 166], fill=wood)
        d.rectangle([ax - 22, 110, ax - 16, 200], fill=wood)
        d.rectangle([ax + 20, 166, ax + 26, 200], fill=wood)
    elif act == "jump":
        d.ellipse([ax - 22, 196, ax + 22, 204], fill=(150, 140, 120))
    back = [k for k in range(len(poses)) if k not in (a, tg)] + ([] if tg is None else [tg])
    pts = {k: draw_person(d, clip["people"][k], poses[k]) for k in back + [a]}
    hx, hy = pts[a]["head"]
    if act == "hug":
        cx, cy = (hx + pts[tg]["head"][0]) / 2, hy - 34
        for dx in (-5, 5):
            d.ellipse([cx + dx - 5, cy - 5, cx + dx + 5, cy + 5], fill="white", outline=INK)
        d.polygon([(cx - 10, cy + 1), (cx + 10, cy + 1), (cx, cy + 13)], fill="white", outline=INK)
    elif act == "wave":
        wx, wy = pts[a]["hands"][side]
        for r in (10, 17):
            d.arc([wx - r, wy - r, wx + r, wy + r], 210, 330, fill=INK, width=2)
    elif act == "laugh":
        for dx in (-1, 0, 1):
            d.line([(hx + 14 * dx, hy - 19), (hx + 24 * dx, hy - 30)], fill=INK, width=3)
    elif act == "cry":
        for ex in (-5, 5):
            for k in range(2):
                y = hy + 2 + (30 * t + 15 * k) % 30
                d.ellipse([hx + ex - 3, y, hx + ex + 3, y + 8], fill=(90, 170, 255))
    elif act == "argue":
        gap = abs(pts[tg]["head"][0] - hx)
        zig = [(hx + side * (18 + 10 * k), hy - 24 - 9 * (k % 2)) for k in range(int(gap / 10) - 3)]
        d.line(zig, fill=INK, width=3)
    return np.asarray(img)


def write_demo_video(clip: dict, raw: Path) -> None:
    """Render the clip and encode it as a real mp4 (H.264 where the PyAV wheel has libx264) in
    the folder `raw`."""
    import av

    def _write(tmp: str) -> None:
        with av.open(tmp, "w", format="mp4") as container:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(codec, rate=DEMO_FPS)
            stream.width, stream.height = DEMO_SIZE
            stream.pix_fmt = "yuv420p"
            stream.options = (
                {"crf": "18", "threads": "1"} if codec == "libx264" else {"qscale": "2"}
            )
            for k in range(round(clip["duration"] * DEMO_FPS)):
                frame = av.VideoFrame.from_ndarray(
                    render_demo_frame(clip, k / DEMO_FPS), format="rgb24"
                )
                frame.pts, frame.time_base = k, Fraction(1, DEMO_FPS)
                container.mux(stream.encode(frame))
            container.mux(stream.encode())

    atomic_write(raw / f"{clip['clip_id']}.mp4", _write)


def demo_transcript(clip: dict, fmt: int) -> tuple[str, str]:
    """(suffix, text) of the clip's transcript in format `fmt`: 0 conversation JSON with start
    and end (words spread over characters), 1 Seamless JSON with word times, 2 .srt, 3 .vtt."""
    cid, evs = clip["clip_id"], clip["events"]
    if fmt == 0:
        turns = [
            {"speaker": "narrator", "utterance": e["text"], "timestamp": e["u_start"]}
            | {"start": e["u_start"], "end": e["u_end"]}
            for e in evs
        ]
        return ".json", json.dumps({"conversation_id": cid, "turns": turns}, indent=1)
    if fmt == 1:
        segs = []
        for e in evs:
            text, u0, u1 = e["text"], e["u_start"], e["u_end"]
            at = lambda c, text=text, u0=u0, u1=u1: round(u0 + (u1 - u0) * c / len(text), 3)  # noqa: E731
            words = [
                {"word": m.group(), "start": at(m.start()), "end": at(m.end()), "score": 1.0}
                for m in re.finditer(r"\S+", text)
            ]
            segs.append({"start": u0, "end": u1, "transcript": text, "words": words})
        return ".json", json.dumps({"id": cid, "metadata:transcript": segs}, indent=1)

    def stamp(t: float) -> str:
        ms = round(t * 1000)
        sep = "," if fmt == 2 else "."
        return (
            f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"
        )

    cues = [
        f"{k + 1}\n{stamp(e['u_start'])} --> {stamp(e['u_end'])}\n{e['text']}\n"
        for k, e in enumerate(evs)
    ]
    return (".srt", "\n".join(cues)) if fmt == 2 else (".vtt", "WEBVTT\n\n" + "\n".join(cues))


def demo_splits(clip_ids: list[str], val_frac: float, test_frac: float) -> dict[str, str]:
    """Demo splits with exact shares (at least one clip in val and test once there are 3 clips):
    clips ordered by the hash of their id, test first, then val, the rest train."""
    order = sorted(clip_ids, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    n = len(order)
    n_test = max(1, round(test_frac * n)) if test_frac > 0 and n >= 3 else 0
    n_val = max(1, round(val_frac * n)) if val_frac > 0 and n >= 3 else 0
    return {
        c: "test" if k < n_test else "val" if k < n_test + n_val else "train"
        for k, c in enumerate(order)
    }


def make_demo(args: argparse.Namespace, imap) -> None:
    """Write the demo's videos and transcripts (formats in turn) to OUT/raw/, its scene labels to
    OUT/scenes.csv and its splits to OUT/raw/splits.csv; point args at them. `imap(fn, items)`
    maps over items (prep's worker pool)."""
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    clips = [demo_clip(i, args.seed) for i in range(args.demo)]
    for i, clip in enumerate(clips):
        suffix, text = demo_transcript(clip, i % 4)
        atomic_write(
            raw / f"{clip['clip_id']}{suffix}", lambda tmp, text=text: Path(tmp).write_text(text)
        )
    videos = imap(functools.partial(write_demo_video, raw=raw), clips)
    list(tqdm(videos, total=len(clips), desc="demo videos", unit="clip"))  # drive the pool
    scenes = [f"clip_id,start,end,{','.join(SCENE_SLOTS)},people\n"]
    for c in clips:
        names = [p["name"] for p in c["people"]]
        for e in c["events"]:
            target = "" if e["target"] is None else names[e["target"]]
            scenes.append(
                f"{c['clip_id']},{e['start']},{e['end']},{names[e['actor']]},{e['action']},"
                f"{target},{';'.join(names)}\n"
            )
    atomic_write(args.out / "scenes.csv", lambda tmp: Path(tmp).write_text("".join(scenes)))
    splits = demo_splits([c["clip_id"] for c in clips], args.val_frac, args.test_frac)
    rows = "clip_id,split\n" + "".join(f"{c},{s}\n" for c, s in splits.items())
    atomic_write(raw / "splits.csv", lambda tmp: Path(tmp).write_text(rows))
    args.videos, args.transcripts = raw, raw
    args.split_file = args.split_file or raw / "splits.csv"
