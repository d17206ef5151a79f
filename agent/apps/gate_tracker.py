"""Per-frame person detection and cross-frame tracking for the thermal gate (any H x W frame in °C).

Per frame: the scene background is the frame's median; warm connected regions (> background +
`fg_delta_k`) whose warmest skin is `head_min_k` above the background are people (in a warm hall,
clothing can come apart from its head: such a region has no face and is not a traveller).
A person's head is the top of their region, down to where the region widens
into the shoulders. Inside the head: the hottest pixels (skin that is not a hot object: anything
above `object_c`, a cup or a heater, is masked with its neighbours), their mean, and the mean of the
skin, with the head's apparent size (a distance proxy).

Pixel-counted limits are stated for a 32-column frame (the MLX90640) and scale with the frame's width
(`scale` = width / 32), so the same tracker follows travellers at 160 x 120 or 384 x 288.

Across frames: detections are matched to tracks by predicted column (constant velocity) and head
height; a track ends after `max_gap` frames unseen. One finished track = one traveller. Its
measurement is the "hottest stable area": the mean over its `top_k` best whole-head frames, so a
single noisy frame cannot make a fever. Tracks that never move (a warm fixture) are not travellers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

FEATURES = ("head_max_c", "head_hot_c", "head_skin_c", "background_c", "head_area_px", "head_width_px")


@dataclass(frozen=True, slots=True)
class TrackerParams:
    fg_delta_k: float = 2.0  # warmer than the background by this much: part of a person
    head_min_k: float = 3.0  # a region whose warmest skin is not this much warmer has no face in it
    min_area_px: int = 3
    object_c: float = 41.0  # no skin reads this hot: a drink, a lamp
    eye_rows: float = 0.7  # share of the head's rows, from the top, searched for the hottest spot
    max_gap: int = 3  # frames a track may go unseen
    top_k: int = 3  # best frames averaged into the measurement
    min_frames: int = 2  # whole-head frames needed for a screening
    min_travel_px: float = 4.0  # a track that moved less is a fixture, not a traveller
    max_track_frames: int = 400  # a track this long is a fixture: closed and ignored


@dataclass(slots=True)
class Detection:
    cx: float  # head centre column
    top: int  # first row of the person's region
    head_max: float
    head_hot: float  # mean of the two hottest head pixels
    head_skin: float  # mean of the head pixels closer to head_max than to the background
    area: int  # those pixels' count
    width: int  # widest head row, pixels
    partial: bool  # cut by the frame's edge: not measured
    objects: int  # hot-object pixels masked in the region


@dataclass
class Track:
    id: int
    first_idx: int
    first_mono: float
    first_ts: float
    last_idx: int
    last_cx: float
    last_top: int
    vx: float = 0.0  # columns per frame
    seen: int = 0
    start_cx: float = 0.0
    good: list[tuple[float, float, float, int, int, float, float, int, int, str]] = field(default_factory=list)
    # (head_hot, head_max, head_skin, area, width, background, mono/ts key, frame index, faces in the frame,
    #  why the frame should not be measured or "") per whole-head frame
    best_ts: float = 0.0
    best_frame: np.ndarray | None = None  # kept only when thumbnails are wanted
    objects: int = 0


@dataclass(frozen=True, slots=True)
class FinishedTrack:
    id: int
    features: tuple[float, ...]  # in FEATURES order
    frames: int  # frames the traveller was seen in
    good_frames: int  # whole-head frames among them
    first_mono: float
    last_mono: float
    best_ts: float  # wall time of the hottest frame
    best_mono: float
    best_cx: float
    direction: int  # +1 left to right, -1 right to left
    hot_object: bool  # a hot object was masked near this traveller
    thumbnail: np.ndarray | None
    faces: int = 1  # most faces in view in any of the frames measured (> 1: not alone in view)
    unusable: str = ""  # too few usable frames: measured on flagged ones anyway, this is their commonest flag


class Tracker:
    def __init__(self, params: TrackerParams | None = None, keep_frames: bool = False) -> None:
        self.p = params or TrackerParams()
        self.keep_frames = keep_frames
        self.tracks: list[Track] = []
        self.frame_idx = 0
        self._next_id = 1
        self._last_mono = 0.0
        # counters
        self.frames = 0
        self.fragments = 0  # tracks too short or too partial to screen
        self.fixtures = 0  # tracks that did not move
        self._kernel = np.ones((3, 3), np.uint8)
        self._width = 0
        self.s = 1.0  # pixels per 32-column pixel: set from the frame's width

    def _set_width(self, width: int) -> None:
        self._width = width
        self.s = max(1.0, width / 32.0)
        k = 2 * round(self.s) + 1
        self._kernel = np.ones((k, k), np.uint8)

    # --- per frame ---------------------------------------------------------------------------
    def detect(self, frame: np.ndarray) -> tuple[float, list[Detection]]:
        p = self.p
        if frame.shape[1] != self._width:
            self._set_width(frame.shape[1])
        s = self.s
        flat = frame.reshape(-1)
        half = flat.size // 2
        bg = float(np.partition(flat, half)[half])  # the median: most of the scene is background
        mask = frame > bg + p.fg_delta_k
        if not mask.any():
            return bg, []
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        hot = frame > p.object_c
        any_hot = bool(hot.any())
        if any_hot:
            hot = cv2.dilate(hot.view(np.uint8), self._kernel).view(bool)
        w_img = frame.shape[1]
        out = []
        for k in range(1, n):
            x, y, w, h, area = stats[k].tolist()
            if area < p.min_area_px * s * s:
                continue
            sub = labels[y:y + h, x:x + w] == k
            widths = np.count_nonzero(sub, axis=1).tolist()
            crown = max(3, round(3 * s))
            ref = max(widths[:crown])  # crown and forehead
            end = h
            for i in range(crown, h):
                if widths[i] >= 1.5 * ref + 1:  # the shoulders: the head ends here
                    end = i
                    break
            end = min(end, max(crown, 2 * ref + 1))  # a head is about twice as tall as wide, in pixels
            hw = max(widths[:end])
            head = sub[:end]
            objects = 0
            if any_hot:
                hmask = hot[y:y + end, x:x + w]
                objects = int(np.count_nonzero(head & hmask))
                head = head & ~hmask
            pix = frame[y:y + end, x:x + w][head]
            if pix.size == 0:
                continue
            # the inner eye corner is mid-face: the hottest spot is sought above the mouth and chin,
            # where a cup or a hand would otherwise be mistaken for skin
            eyes = min(end, max(2, int(np.ceil(p.eye_rows * end))))
            spot = frame[y:y + eyes, x:x + w][head[:eyes]]
            if spot.size == 0:
                spot = pix
            hmax = float(spot.max())
            if hmax < bg + p.head_min_k:  # warm clothing cut off from its head, a lamp's glow: no one's face
                continue
            top2 = float(np.partition(spot, -2)[-2:].sum()) / 2 if spot.size >= 2 else hmax
            skin = pix[pix > (hmax + bg) / 2]
            cols = np.flatnonzero(head.any(axis=0))
            cx = x + float(cols.sum()) / cols.size
            partial = x == 0 or x + w == w_img  # a head cut at the top still shows its face
            out.append(Detection(cx, y, hmax, top2, float(skin.sum()) / skin.size, int(skin.size), hw,
                                 partial, objects))
        return bg, out

    def process(self, frame: np.ndarray, mono: float, ts: float, flag: str = "") -> list[FinishedTrack]:
        """Feed one frame; returns the tracks that ended with it. A frame with a `flag` (why it should not
        be measured, e.g. its temperature reference was occluded) is tracked, but measured only for
        travellers who have too few unflagged frames."""
        self.frames += 1
        self.frame_idx += 1
        self._last_mono = mono
        done = self._expire(self.frame_idx)  # tracks unseen for too long end before they can match
        bg, dets = self.detect(frame)
        self._associate(dets, bg, frame, mono, ts, flag)
        return done

    def flush(self) -> list[FinishedTrack]:
        """End every open track (the stream stopped)."""
        return self._expire(None)

    # --- tracking ----------------------------------------------------------------------------
    def _associate(self, dets: list[Detection], bg: float, frame: np.ndarray, mono: float, ts: float,
                   flag: str) -> None:
        idx = self.frame_idx
        w_img = frame.shape[1]
        s = self.s
        pairs = []
        for ti, tr in enumerate(self.tracks):
            gap = idx - tr.last_idx
            pred = min(max(tr.last_cx + tr.vx * gap, 0.0), w_img - 1.0)  # a traveller leaving: at the edge
            gate = 13.0 * s if tr.seen < 2 else max(6.0 * s, abs(tr.vx) * gap) + 3.0 * s
            moving = tr.vx if tr.seen >= 2 and abs(tr.vx) > 0.5 * s else 0.0
            for di, d in enumerate(dets):
                cost = abs(d.cx - pred)
                backwards = moving and (d.cx - tr.last_cx) * moving < -3.0 * s  # travellers do not turn back
                if cost <= gate and abs(d.top - tr.last_top) <= 5 * s and not backwards:
                    pairs.append((cost, ti, di))
        pairs.sort()
        used_t: set[int] = set()
        used_d: set[int] = set()
        for _, ti, di in pairs:
            if ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            self._update(self.tracks[ti], dets[di], bg, frame, mono, ts, len(dets), flag)
        for di, d in enumerate(dets):
            if di not in used_d:
                tr = Track(id=self._next_id, first_idx=idx, first_mono=mono, first_ts=ts, last_idx=idx,
                           last_cx=d.cx, last_top=d.top, start_cx=d.cx)
                self._next_id += 1
                self.tracks.append(tr)
                self._update(tr, d, bg, frame, mono, ts, len(dets), flag, new=True)

    def _update(self, tr: Track, d: Detection, bg: float, frame: np.ndarray, mono: float, ts: float,
                faces: int, flag: str, new: bool = False) -> None:
        idx = self.frame_idx
        if not new:
            gap = max(1, idx - tr.last_idx)
            v = (d.cx - tr.last_cx) / gap
            tr.vx = v if tr.seen < 2 else 0.5 * tr.vx + 0.5 * v
        tr.last_idx, tr.last_cx, tr.last_top = idx, d.cx, d.top
        tr.seen += 1
        tr.objects += d.objects
        if not d.partial:
            tr.good.append((d.head_hot, d.head_max, d.head_skin, d.area, d.width, bg, mono, idx, faces, flag))
            if self.keep_frames and (tr.best_frame is None or d.head_hot >= max(g[0] for g in tr.good)):
                tr.best_frame = frame.copy()
            if d.head_hot >= max(g[0] for g in tr.good):
                tr.best_ts = ts

    def _expire(self, idx: int | None) -> list[FinishedTrack]:
        done: list[FinishedTrack] = []
        keep: list[Track] = []
        for tr in self.tracks:
            too_long = idx is not None and idx - tr.first_idx >= self.p.max_track_frames
            if idx is not None and idx - tr.last_idx <= self.p.max_gap and not too_long:
                keep.append(tr)
                continue
            fin = self._finish(tr, fixture=too_long)
            if fin is not None:
                done.append(fin)
        self.tracks = keep
        return done

    def _finish(self, tr: Track, fixture: bool = False) -> FinishedTrack | None:
        if fixture or (abs(tr.last_cx - tr.start_cx) < self.p.min_travel_px * self.s and tr.seen >= 3):
            self.fixtures += 1
            return None
        if len(tr.good) < self.p.min_frames:
            if tr.seen >= 3:  # a glimpse at the frame's edge is not worth counting
                self.fragments += 1
            return None
        usable = [g for g in tr.good if not g[9]]
        unusable = ""
        if len(usable) < self.p.min_frames:  # measured anyway (the traveller is counted), but flagged
            flags = [g[9] for g in tr.good if g[9]]
            unusable = max(sorted(set(flags)), key=flags.count)
            usable = tr.good
        best = sorted(usable, key=lambda g: -g[0])[: self.p.top_k]
        m = np.mean(np.array([g[:6] for g in best], dtype=np.float64), axis=0)
        bg_all = float(np.mean([g[5] for g in usable]))
        features = (float(m[1]), float(m[0]), float(m[2]), bg_all, float(m[3]), float(m[4]))
        top = best[0]
        return FinishedTrack(
            id=tr.id, features=features, frames=tr.seen, good_frames=len(tr.good), first_mono=tr.first_mono,
            last_mono=self._last_mono, best_ts=tr.best_ts, best_mono=top[6], best_cx=self._cx_at(tr, top[7]),
            direction=1 if tr.last_cx >= tr.start_cx else -1, hot_object=tr.objects > 0,
            thumbnail=tr.best_frame, faces=max(g[8] for g in best), unusable=unusable)

    @staticmethod
    def _cx_at(tr: Track, frame_idx: int) -> float:
        """Approximate head column at a past frame, from the track's endpoints."""
        span = max(1, tr.last_idx - tr.first_idx)
        f = (frame_idx - tr.first_idx) / span
        return tr.start_cx + f * (tr.last_cx - tr.start_cx)
