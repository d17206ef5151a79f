"""Procedural specimen photographs for the handheld: sanded wood end grain per species, and insects.

A second, independent reading of what a wood anatomist and an entomologist look at; it never imports
the classifier. Every image is deterministic for (label, seed) and its label is the ground truth.

Wood (macro camera, fixed field FIELD_MM across the short side, ring light; XyloTron style): growth
rings as slightly curved bands, earlywood lighter than latewood; vessels (pores) by size, density,
grouping (solitary or radial multiples) and arrangement (diffuse-, semi-ring- or ring-porous); rays
(spacing, width); axial parenchyma (none, thin tangential bands, marginal lines, aliform halos around
pores); colour and pore deposits. Every photograph varies what a person with a handheld varies:
rotation, a little scale, exposure and colour cast, uneven light, focus blur, sanding scratches,
sensor noise. Species are *procedural stand-ins* for the CITES-listed rosewoods (Dalbergia),
red sandalwood (Pterocarpus santalinus), mahoganies (Swietenia) and their unlisted look-alikes: they
carry each wood's published anatomy in broad strokes, not its real appearance.

Insects (a dorsal photograph on a card or on bark): longhorn beetles and look-alikes by body colour,
spot pattern, mottling, antenna length and banding, body shape; varying pose, size, background,
light, blur.

    customs-edge simulate specimens wood DIR [--per-class 120] [--seed 0] [--size 320]
    customs-edge simulate specimens insects DIR ...
write DIR/<label>/<label>_<n>.jpg and DIR/labels.json ({label: {"name", "cites", "quarantine_pest"}}),
the layout `customs-edge models train wood --images DIR` reads.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FIELD_MM = 6.0  # field of view across the image's short side (a handheld macro lens at fixed distance)


@dataclass(frozen=True)
class Wood:
    label: str
    name: str
    cites: str | None  # CITES appendix of the real species (I, II, III) or None
    colour: tuple[int, int, int]  # BGR heartwood
    porosity: str  # "diffuse" | "semi-ring" | "ring"
    pore_mm: float  # mean vessel diameter
    pores_per_mm2: float
    multiples: float  # share of pores in radial multiples of 2-4
    ring_mm: float  # mean growth ring width
    ring_contrast: float  # latewood darkening 0-1
    rays_per_mm: float
    ray_px: float  # ray width, in units of the field's pixel at 320 px
    ray_contrast: float  # + lighter, - darker
    parenchyma: str  # "none" | "banded" | "marginal" | "aliform"
    band_mm: float = 0.0  # spacing of banded parenchyma
    deposit: float = 0.0  # share of pores filled with light (+) deposits


# Stand-ins. Appendix per CITES (Dalbergia nigra I; other Dalbergia, Pterocarpus santalinus, Swietenia
# macrophylla / mahagoni II). Anatomy after the InsideWood descriptions, simplified.
WOODS: tuple[Wood, ...] = (
    Wood("dalbergia_nigra", "Dalbergia nigra (Brazilian rosewood)", "I", (40, 62, 105), "diffuse", 0.16, 6.0,
         0.3, 3.0, 0.15, 9.0, 1.0, -0.10, "banded", 0.22),
    Wood("dalbergia_latifolia", "Dalbergia latifolia (Indian rosewood)", "II", (55, 60, 95), "diffuse", 0.20, 4.0,
         0.4, 4.0, 0.10, 7.0, 1.3, -0.08, "banded", 0.35),
    Wood("pterocarpus_santalinus", "Pterocarpus santalinus (red sandalwood)", "II", (35, 40, 140), "diffuse", 0.12,
         10.0, 0.3, 2.0, 0.20, 12.0, 0.8, -0.06, "banded", 0.15),
    Wood("swietenia_macrophylla", "Swietenia macrophylla (big-leaf mahogany)", "II", (70, 100, 165), "diffuse",
         0.22, 5.0, 0.4, 4.0, 0.25, 5.0, 1.6, 0.08, "marginal", 0.0, 0.25),
    Wood("swietenia_mahagoni", "Swietenia mahagoni (Cuban mahogany)", "II", (55, 80, 140), "diffuse", 0.14, 11.0,
         0.45, 2.5, 0.30, 6.5, 1.2, 0.07, "marginal", 0.0, 0.45),
    Wood("machaerium_scleroxylon", "Machaerium scleroxylon (Santos rosewood, unlisted)", "none", (50, 75, 120),
         "diffuse", 0.17, 3.0, 0.2, 3.0, 0.15, 11.0, 0.8, -0.04, "aliform", 0.0),
    Wood("pterocarpus_soyauxii", "Pterocarpus soyauxii (African padauk, unlisted)", "none", (50, 70, 190),
         "diffuse", 0.25, 3.0, 0.35, 5.0, 0.10, 9.0, 0.8, -0.05, "aliform", 0.0),
    Wood("khaya_ivorensis", "Khaya ivorensis (African mahogany, unlisted)", "none", (85, 120, 180), "diffuse",
         0.24, 4.0, 0.55, 6.0, 0.05, 6.0, 1.4, 0.10, "none", 0.0),
    Wood("carapa_guianensis", "Carapa guianensis (andiroba, unlisted)", "none", (80, 95, 150), "diffuse", 0.18,
         7.0, 0.5, 5.0, 0.10, 7.0, 1.8, 0.12, "banded", 0.9),
    Wood("millettia_laurentii", "Millettia laurentii (wenge, unlisted)", "none", (30, 40, 55), "diffuse", 0.22,
         3.0, 0.3, 3.0, 0.10, 9.0, 0.8, -0.05, "banded", 0.12),
    Wood("quercus_robur", "Quercus robur (European oak, unlisted)", "none", (120, 165, 205), "ring", 0.28, 3.0,
         0.0, 2.2, 0.35, 3.0, 5.0, 0.10, "none", 0.0),
    Wood("fraxinus_excelsior", "Fraxinus excelsior (European ash, unlisted)", "none", (150, 190, 215), "ring",
         0.22, 4.0, 0.2, 2.8, 0.25, 8.0, 1.0, 0.05, "marginal", 0.0),
)
# cites is None or an appendix; "none" above reads better in the table
WOODS = tuple(Wood(**{**w.__dict__, "cites": None if w.cites == "none" else w.cites}) for w in WOODS)
# Not in the shipped model's labels (no photos of them are written by write_dataset): what an officer
# may meet that the reference collection lacks. `models evaluate` counts how often they are abstained.
UNSEEN_WOODS: tuple[Wood, ...] = (
    Wood("tectona_grandis", "Tectona grandis (teak, unlisted)", None, (60, 120, 170), "semi-ring", 0.20, 4.0,
         0.2, 3.5, 0.20, 6.0, 1.2, 0.06, "marginal", 0.0, 0.3),
    Wood("dalbergia_retusa", "Dalbergia retusa (cocobolo)", "II", (40, 70, 150), "diffuse", 0.15, 5.0,
         0.3, 2.5, 0.30, 10.0, 0.9, -0.08, "banded", 0.18),
    Wood("entandrophragma_cylindricum", "Entandrophragma cylindricum (sapele, unlisted)", None, (65, 95, 160),
         "diffuse", 0.13, 12.0, 0.5, 4.0, 0.15, 8.0, 1.0, 0.06, "none", 0.0, 0.1),
)
WOOD = {w.label: w for w in WOODS + UNSEEN_WOODS}


def _coords(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(u, v) in mm for every pixel: v across the rings (radial), u along them (tangential); the
    specimen's rotation and scale; and (cos, sin) of the rotation."""
    px_mm = min(h, w) / FIELD_MM * rng.uniform(0.88, 1.15)
    a = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x - w / 2) / px_mm
    y = (y - h / 2) / px_mm
    ca, sa = float(np.cos(a)), float(np.sin(a))
    u = ca * x + sa * y
    v = -sa * x + ca * y
    return u, v, px_mm, a


def wood_image(label: str, seed: int, width: int = 320, height: int | None = None) -> np.ndarray:
    """A photograph (HxWx3 uint8 BGR) of a sanded end grain of `label` (a WOODS label)."""
    sp = WOOD[label]
    h, w = height or width, width
    rng = np.random.default_rng([seed, sum(label.encode())])
    u, v, px_mm, ang = _coords(h, w, rng)
    px320 = min(h, w) / 320.0
    curv = rng.uniform(-0.04, 0.04)  # rings curve a little (the pith is far off)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 4 * px320)
    ring_mm = sp.ring_mm * rng.uniform(0.8, 1.25)
    radial = v + curv * u * u + 0.05 * noise
    phase = radial / ring_mm + rng.uniform(0, 1)
    frac = (phase % 1.0).astype(np.float32)  # 0 start of the year's growth, 1 at the ring boundary
    tone = 1.0 - sp.ring_contrast * frac**2.5
    # rays: thin radial lines, spaced along u, wandering a little
    ray_phase = u * sp.rays_per_mm + 0.15 * np.sin(v * 1.3 + rng.uniform(0, 6.3)) + 0.3 * noise
    ray_width = max(0.04, sp.ray_px * px320 / px_mm * sp.rays_per_mm)  # fraction of a ray period
    rays = np.clip(1.0 - np.abs((ray_phase % 1.0) - 0.5) * 2 / ray_width, 0, 1) ** 0.7
    tone += sp.ray_contrast * rays
    if sp.parenchyma == "banded":
        bp = radial / sp.band_mm + 0.2 * noise
        bands = np.clip(1.0 - np.abs((bp % 1.0) - 0.5) * 2 / 0.28, 0, 1)
        tone += 0.18 * bands
    elif sp.parenchyma == "marginal":
        tone += 0.35 * np.clip((frac - 0.93) / 0.07, 0, 1)
    fibres = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 0.7 * px320)
    tone *= 1.0 + 0.05 * fibres + 0.06 * noise
    colour = np.array(sp.colour, np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    img = np.clip(tone[..., None] * colour, 0, 255).astype(np.uint8)
    _pores(img, sp, rng, frac, u, v, px_mm, ang, colour)
    return _photograph(img, rng, px320)


def _pores(img: np.ndarray, sp: Wood, rng: np.random.Generator, frac: np.ndarray, u: np.ndarray,
           v: np.ndarray, px_mm: float, ang: float, colour: np.ndarray) -> None:
    h, w = img.shape[:2]
    area_mm2 = h * w / px_mm**2
    n = int(rng.poisson(0.7 * sp.pores_per_mm2 * area_mm2 * (2.5 if sp.porosity == "ring" else 1.0)))
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    f = frac[ys.astype(int), xs.astype(int)]
    size = rng.lognormal(np.log(sp.pore_mm), 0.25, n)
    if sp.porosity == "ring":
        early = f < 0.22
        keep = early | (rng.random(n) < 0.12)
        size = np.where(early, size * 1.3, size * 0.35)
    elif sp.porosity == "semi-ring":
        keep = rng.random(n) < 1.0 - 0.6 * f
        size = size * (1.2 - 0.6 * f)
    else:
        keep = np.ones(n, bool)
    dark = tuple(float(c) * 0.22 for c in colour)
    light = tuple(min(255.0, float(c) * 1.5 + 40) for c in colour)
    halo = tuple(min(255.0, float(c) * 1.35 + 25) for c in colour)
    radial = (-np.sin(ang), np.cos(ang))  # pixel direction of +v
    for x0, y0, d in zip(xs[keep], ys[keep], size[keep], strict=True):
        r = max(0.6, d * px_mm / 2 * 0.75)
        group = 1 if rng.random() >= sp.multiples else int(rng.integers(2, 4))
        fill = light if rng.random() < sp.deposit else dark
        for k in range(group):
            cx = x0 + radial[0] * k * r * 1.8
            cy = y0 + radial[1] * k * r * 1.8
            c = (int(cx * 4), int(cy * 4))
            axes = (max(1, int(r * 4)), max(1, int(r * 4 * rng.uniform(0.75, 1.1))))
            if sp.parenchyma == "aliform":
                cv2.ellipse(img, c, (axes[0] * 9 // 4, axes[1] * 6 // 4), float(np.degrees(ang)), 0, 360,
                            halo, -1, cv2.LINE_AA, 2)
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, fill, -1, cv2.LINE_AA, 2)


def _photograph(img: np.ndarray, rng: np.random.Generator, px: float) -> np.ndarray:
    """What the handheld adds: exposure, colour cast, uneven light, scratches, focus blur, noise."""
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    if rng.random() < 0.7:  # sanding scratches: fine parallel lines at one angle
        a = rng.uniform(0, np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        s = x * np.cos(a) + y * np.sin(a)
        lines = rng.normal(0, 1, int(abs(h) + abs(w)) * 2 + 4).astype(np.float32)
        scratch = lines[(s + w + h).astype(int) // max(1, round(px))]
        out = out * (1.0 + rng.uniform(0.01, 0.05) * scratch)[..., None]
    gain = rng.uniform(0.75, 1.2)
    cast = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ga = rng.uniform(0, 2 * np.pi)
    grad = 1.0 + rng.uniform(0, 0.15) * ((xx / w - 0.5) * np.cos(ga) + (yy / h - 0.5) * np.sin(ga))
    vignette = 1.0 - 0.15 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    out = out * (gain * grad * vignette)[..., None] * cast
    sigma = rng.uniform(0.0, 0.9) * px
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out += rng.normal(0, rng.uniform(1.0, 4.0), out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


# --- insects -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Insect:
    label: str
    name: str
    quarantine_pest: bool
    body: tuple[int, int, int]  # BGR
    spots: tuple[int, int, int] | None  # BGR of the elytral spots / patches, None for none
    n_spots: tuple[int, int]  # range
    spot_mm: float
    mottle: float  # 0 smooth-glossy .. 1 finely mottled
    length_mm: float  # body length
    slender: float  # width / length of the elytra
    antenna: float  # antenna length / body length
    banded: bool  # antennae ringed light and dark
    gloss: float


# Regulated: Anoplophora glabripennis (ALB), A. chinensis (CLB), Monochamus alternatus (pine-wilt
# nematode vector) are EU/China/US quarantine pests. Look-alikes: native longhorns and a ground beetle.
INSECTS: tuple[Insect, ...] = (
    Insect("anoplophora_glabripennis", "Anoplophora glabripennis (Asian longhorned beetle)", True,
           (20, 20, 22), (235, 235, 230), (14, 22), 1.6, 0.0, 30.0, 0.34, 2.2, True, 0.5),
    Insect("anoplophora_chinensis", "Anoplophora chinensis (citrus longhorned beetle)", True,
           (25, 22, 20), (230, 230, 225), (6, 10), 2.6, 0.1, 30.0, 0.36, 1.8, True, 0.6),
    Insect("monochamus_alternatus", "Monochamus alternatus (Japanese pine sawyer)", True,
           (35, 60, 110), (60, 120, 190), (30, 50), 1.0, 0.6, 24.0, 0.32, 2.3, False, 0.15),
    Insect("acanthocinus_aedilis", "Acanthocinus aedilis (timberman beetle, harmless)", False,
           (105, 115, 120), (50, 55, 60), (4, 8), 2.0, 0.9, 16.0, 0.38, 4.0, True, 0.05),
    Insect("rhagium_inquisitor", "Rhagium inquisitor (ribbed pine borer, harmless)", False,
           (95, 110, 120), (30, 45, 70), (2, 4), 4.0, 0.8, 15.0, 0.42, 0.5, False, 0.05),
    Insect("pterostichus_niger", "Pterostichus niger (black ground beetle, harmless)", False,
           (18, 18, 20), None, (0, 0), 0.0, 0.0, 18.0, 0.45, 0.45, False, 0.8),
    Insect("aromia_moschata", "Aromia moschata (musk beetle, harmless)", False,
           (60, 110, 40), None, (0, 0), 0.0, 0.2, 28.0, 0.30, 1.0, False, 0.7),
)
UNSEEN_INSECTS: tuple[Insect, ...] = (
    Insect("saperda_carcharias", "Saperda carcharias (large poplar borer, harmless)", False,
           (80, 120, 150), (40, 70, 100), (20, 40), 0.8, 0.7, 28.0, 0.36, 1.1, True, 0.05),
    Insect("monochamus_galloprovincialis", "Monochamus galloprovincialis (pine sawyer)", True,
           (30, 40, 60), (180, 190, 200), (25, 40), 0.8, 0.5, 22.0, 0.33, 2.0, True, 0.1),
)
INSECT = {i.label: i for i in INSECTS + UNSEEN_INSECTS}
BACKGROUNDS = ((215, 220, 225), (190, 200, 205), (70, 95, 120), (110, 140, 165), (200, 215, 210))


def insect_image(label: str, seed: int, width: int = 320, height: int | None = None) -> np.ndarray:
    """A dorsal photograph (HxWx3 uint8 BGR) of one `label` (an INSECTS label) on a card or bark."""
    sp = INSECT[label]
    h, w = height or width, width
    rng = np.random.default_rng([seed, sum(label.encode()), 7])
    s = min(h, w) / 320.0
    bg = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], np.float32) * rng.uniform(0.85, 1.1, 3)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 3 * s)
    img = np.clip(bg * (1.0 + 0.08 * tex)[..., None], 0, 255).astype(np.uint8)
    px_mm = (150 * s / sp.length_mm) * rng.uniform(0.85, 1.15)  # the body fills about half the frame
    length = sp.length_mm * px_mm
    width_e = length * sp.slender
    # canvas in body coordinates (x across, y along; head up), drawn at 4x subpixel, then rotated
    c = (w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.08, 0.08) * h)
    body = np.array(sp.body, np.float32) * rng.uniform(0.9, 1.1, 3)
    bcol = tuple(float(x) for x in body)
    shadow = tuple(float(x) * 0.55 for x in bg)
    layer = img.copy()
    ang = rng.uniform(0, 360)
    rot = cv2.getRotationMatrix2D(c, ang, 1.0)

    def pt(x: float, y: float) -> tuple[int, int]:
        p = rot @ np.array([c[0] + x, c[1] + y, 1.0])
        return int(p[0] * 16), int(p[1] * 16)

    def ell(x: float, y: float, ax: float, ay: float, col: tuple[float, ...], a0: float = 0.0) -> None:
        cv2.ellipse(layer, pt(x, y), (max(1, int(ax * 16)), max(1, int(ay * 16))), -ang + a0, 0, 360, col, -1,
                    cv2.LINE_AA, 4)

    # legs and antennae first (under the body)
    leg_col = tuple(v * 0.8 for v in bcol)
    for side in (-1, 1):
        for k, yy in enumerate((-0.05, 0.08, 0.22)):
            x1, y1 = side * width_e * 0.45, yy * length
            x2, y2 = side * width_e * (1.0 + 0.2 * k), (yy + 0.08 * (k - 0.6)) * length
            cv2.line(layer, pt(x1, y1), pt(x2, y2), leg_col, max(1, int(1.8 * s)), cv2.LINE_AA, 4)
        # antenna: from the head, curving back along the body
        seg = 11
        alen = sp.antenna * length
        x, y = side * width_e * 0.15, -0.48 * length
        sweep = rng.uniform(0.2, 0.8)
        for k in range(seg):
            t = (k + 1) / seg
            a = np.radians(-80 + 160 * t * sweep) * side
            nx, ny = x + np.sin(a) * alen / seg * side * side, y - np.cos(a) * alen / seg
            nx = x + side * abs(np.sin(a)) * alen / seg
            col = (230.0, 230.0, 225.0) if sp.banded and k % 2 == 0 else bcol
            cv2.line(layer, pt(x, y), pt(nx, ny), col, max(1, int(2.0 * s)), cv2.LINE_AA, 4)
            x, y = nx, ny
    ell(width_e * 0.08, length * 0.05, width_e * 0.55, length * 0.5, shadow)  # shadow
    ell(0, length * 0.12, width_e * 0.5, length * 0.38, bcol)  # elytra
    ell(0, -length * 0.3, width_e * 0.32, length * 0.1, bcol)  # pronotum
    ell(0, -length * 0.43, width_e * 0.22, length * 0.07, tuple(v * 0.9 for v in bcol))  # head
    if sp.spots is not None:
        spot = tuple(float(x) for x in np.array(sp.spots, np.float32) * rng.uniform(0.9, 1.05, 3))
        for _ in range(int(rng.integers(sp.n_spots[0], sp.n_spots[1] + 1))):
            for _tries in range(10):
                sx, sy = rng.uniform(-0.45, 0.45), rng.uniform(-0.3, 0.45)
                if (sx / 0.5) ** 2 + ((sy - 0.12) / 0.38) ** 2 < 0.8:
                    break
            r = sp.spot_mm * px_mm / 2 * rng.uniform(0.6, 1.3)
            ell(sx * width_e, sy * length, r, r * rng.uniform(0.6, 1.2), spot, float(rng.uniform(0, 180)))
    out = layer.astype(np.float32)
    mask = np.abs(layer.astype(np.int16) - img.astype(np.int16)).sum(axis=2) > 12
    if sp.mottle > 0:
        m = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.2 * s)
        out[mask] = out[mask] * (1.0 + 0.35 * sp.mottle * m[mask])[:, None]
    if sp.gloss > 0:  # a specular highlight along the elytra from the ring light
        hl: np.ndarray = np.zeros((h, w), np.float32)
        cv2.ellipse(hl, pt(-width_e * 0.2, 0), (max(1, int(width_e * 0.08 * 16)), max(1, int(length * 0.25 * 16))),
                    -ang, 0, 360, 1.0, -1, cv2.LINE_AA, 4)
        hl = cv2.GaussianBlur(hl, (0, 0), 3 * s)
        out = np.asarray(out + (hl * np.float32(sp.gloss * 120))[..., None] * mask[..., None], np.float32)
    return _photograph(np.clip(out, 0, 255).astype(np.uint8), rng, s)


# --- datasets ----------------------------------------------------------------------------------
KINDS = ("wood", "insects")


def labels(kind: str) -> list[str]:
    """The labels of a kind ("wood" or "insects"), in table order."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return [w.label for w in WOODS] if kind == "wood" else [i.label for i in INSECTS]


def unseen_labels(kind: str) -> list[str]:
    """Species drawn by this module but never written by write_dataset (open-set tests and figures)."""
    labels(kind)
    return [w.label for w in UNSEEN_WOODS] if kind == "wood" else [i.label for i in UNSEEN_INSECTS]


def labels_json(kind: str) -> dict[str, dict[str, object]]:
    """The ground truth per label: name and regulatory status."""
    if kind == "wood":
        return {w.label: {"name": w.name, "cites": w.cites, "quarantine_pest": False} for w in WOODS}
    return {i.label: {"name": i.name, "cites": None, "quarantine_pest": i.quarantine_pest} for i in INSECTS}


def image(kind: str, label: str, seed: int, size: int = 320) -> np.ndarray:
    return wood_image(label, seed, size) if kind == "wood" else insect_image(label, seed, size)


def _write_one(job: tuple[str, str, int, int, str, int]) -> None:
    kind, label, seed, size, path, quality = job
    cv2.imwrite(path, image(kind, label, seed, size), [cv2.IMWRITE_JPEG_QUALITY, quality])


def write_dataset(kind: str, out: str | Path, per_class: int = 120, seed: int = 0, size: int = 320,
                  quality: int = 90, workers: int = 2) -> dict[str, int]:
    """Write out/<label>/<label>_<n>.jpg (per_class each, image seed = seed * 1_000_003 + n) and
    out/labels.json; {label: count}. The images do not depend on `workers`."""
    out = Path(out)
    jobs = []
    for label in labels(kind):
        d = out / label
        d.mkdir(parents=True, exist_ok=True)
        jobs += [(kind, label, seed * 1_000_003 + n, size, str(d / f"{label}_{n:04d}.jpg"), quality)
                 for n in range(per_class)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_one(job)
    counts = dict.fromkeys(labels(kind), per_class)
    (out / "labels.json").write_text(json.dumps(labels_json(kind), indent=2) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="customs-edge simulate specimens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("out", help="dataset folder to write (DIR/<label>/*.jpg)")
    p.add_argument("--per-class", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=320, help="image side, px")
    p.add_argument("--workers", type=int, default=2, help="processes drawing the photos")
    a = p.parse_args(argv)
    if a.per_class < 1 or a.size < 32:
        p.error("--per-class must be >= 1 and --size >= 32")
    print(json.dumps(write_dataset(a.kind, a.out, a.per_class, a.seed, a.size, workers=a.workers)))


if __name__ == "__main__":
    main()
