"""Procedural photos of a synthetic accommodation.

Each scene draws visible evidence of the property's latents: the building archetype and size
(type, size bucket), wall and roof colours (region), a flag (country), a skyline landmark
(city), the setting in views, amenities in their own scenes, and luxury in palette, clutter and
wear. The held-out latents no MTL task reads are drawn too: a spa scene, the decor style on the
walls of rooms and lounges, and the building's age as a darker, cracked facade and walls yellowed
toward ochre, outside and in. With metric tasks
(metric.py), a property's taste hue is drawn as its signature colour (curtains, cushions, stools, towels,
a yoga mat, a parasol outside), and each listing has its own camera (crop and zoom, light, colour cast),
so two listings of one property differ. Photos are jittered (framing, light, sensor noise) so no two are
identical.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SCENES = ("exterior", "room", "view", "pool", "beach", "bar", "garden", "gym", "lounge",
          "kitchen", "hiking", "landmark", "spa")


def _rgb(h, s, v):
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return int(r * 255), int(g * 255), int(b * 255)


def _hash_unit(*keys) -> float:
    """A fixed pseudo-random number per (category, id): colours of a region, shape of a landmark."""
    return float(np.random.default_rng(list(keys)).random())


class Canvas:
    """A PIL canvas addressed in unit coordinates (0..1), so scenes draw the same at any size; a `view`
    (left, top, zoom) shows the square from (left, top) of side 1/zoom (a camera's crop)."""

    def __init__(self, size: int, rng: np.random.Generator, view: tuple[float, float, float] | None = None):
        self.size, self.rng, self.view = size, rng, view
        self.img = Image.new("RGB", (size, size))
        self.draw = ImageDraw.Draw(self.img)

    def _xy(self, box):
        if self.view is None:
            return [round(v * (self.size - 1)) for v in box]
        left, top, zoom = self.view
        return [round((v - (top if k % 2 else left)) * zoom * (self.size - 1)) for k, v in enumerate(box)]

    def rect(self, x0, y0, x1, y1, fill, outline=None):
        self.draw.rectangle(self._xy((x0, y0, x1, y1)), fill=fill, outline=outline)

    def ellipse(self, x0, y0, x1, y1, fill):
        self.draw.ellipse(self._xy((x0, y0, x1, y1)), fill=fill)

    def poly(self, points, fill):
        self.draw.polygon([tuple(self._xy(p)) for p in points], fill=fill)

    def line(self, x0, y0, x1, y1, fill, width=1):
        self.draw.line(self._xy((x0, y0, x1, y1)), fill=fill, width=max(1, round(width * self.size / 96)))

    def gradient(self, y0, y1, top, bottom):
        if self.view is None:
            a, b = round(y0 * self.size), round(y1 * self.size)
            rows = range(a, b)
        else:
            _, origin, zoom = self.view
            a, b = round((y0 - origin) * zoom * self.size), round((y1 - origin) * zoom * self.size)
            rows = range(max(a, 0), min(b, self.size))
        for y in rows:
            t = (y - a) / max(b - a - 1, 1)
            self.draw.line([(0, y), (self.size, y)], fill=tuple(int(top[i] + t * (bottom[i] - top[i])) for i in range(3)))


AGED = (150, 128, 80)  # the ochre that old paint yellows toward
AGE_CAST = 0.35        # how far a 100-year-old building's photos' hues are turned toward its hue


YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)  # luma, chroma
RGB_OF_YIQ = np.linalg.inv(YIQ).astype(np.float32)
AGED_ANGLE = float(np.arctan2(*(YIQ @ np.asarray(AGED, np.float32))[[2, 1]]))


def yellowed(a: np.ndarray, share: float) -> np.ndarray:
    """RGB pixels (float, 0-255) with each hue turned `share` of the way toward AGED's, luma and chroma
    kept (a rotation in YIQ space: 0.2 ms a 64 px photo): the age is a hue of its own, apart from the
    luxury's saturation and brightness."""
    if share <= 0:
        return a
    yiq = a @ YIQ.T
    angle, chroma = np.arctan2(yiq[..., 2], yiq[..., 1]), np.hypot(yiq[..., 1], yiq[..., 2])
    angle += share * ((AGED_ANGLE - angle + np.pi) % (2 * np.pi) - np.pi)  # the shorter way round
    yiq[..., 1], yiq[..., 2] = chroma * np.cos(angle), chroma * np.sin(angle)
    return yiq @ RGB_OF_YIQ.T


def _aged(rgb, share: float) -> tuple[int, int, int]:
    """A colour moved `share` of the way toward AGED: the building's age, in every photo of its walls."""
    return tuple(int(round(c + share * (a - c))) for c, a in zip(rgb, AGED))


class Look:
    """Colours and levels of one property, derived once from its latents."""

    def __init__(self, p):
        lux = float(p["_luxury"])
        self.lux = lux
        self.age = float(p["_age"]) / 100.0
        self.wall = _aged(_rgb(_hash_unit(1, int(p["_region"])), 0.25 + 0.3 * _hash_unit(2, int(p["_region"])),
                               (0.55 + 0.4 * lux) * (1.0 - 0.25 * self.age)), 0.6 * self.age)  # facades darken, yellow
        self.roof = _rgb(_hash_unit(3, int(p["_region"])), 0.6, 0.45)
        self.flag = [_rgb(_hash_unit(4, int(p["_country"]), k), 0.9, 0.9) for k in range(3)]
        self.flag_vertical = _hash_unit(5, int(p["_country"])) < 0.5
        self.interior = _aged(_rgb(0.08 + 0.5 * _hash_unit(6, int(p["_type"])), 0.15 + 0.35 * lux, 0.45 + 0.45 * lux),
                              0.5 * self.age)  # old paint yellows inside too
        self.accent = (212, 175, 55) if lux > 0.65 else _rgb(_hash_unit(7, int(p["_type"])), 0.5, 0.55)
        self.floor = (92, 60, 38) if lux > 0.5 else (150, 150, 140)
        self.wear = 0.25 * (1 - lux)  # stains and noise on cheap places
        self.decor = int(p["_decor"])
        # the taste's own latent (metric.py), only in catalogues with metric tasks: a signature colour
        self.signature = _rgb(float(p["_taste_hue"]) / (2 * np.pi), 0.8, 0.85) if "_taste_hue" in p else None


@dataclass(frozen=True)
class Camera:
    """One listing's photographer: a zoom with its own framing per photo, and levels (contrast about mid-grey,
    brightness, a colour cast) for all its photos."""

    zoom: float
    framing: np.ndarray        # (photos, 2): where each photo's crop sits, 0..1 across the slack
    scale: np.ndarray          # (size, size, 3) float32: levels as a full-size gain and offset (no slow
    offset: np.ndarray         # broadcast over the channels)

    @classmethod
    def draw(cls, rng: np.random.Generator, photos: int, size: int) -> "Camera":
        zoom, framing = float(rng.uniform(1.0, 1.25)), rng.random((photos, 2))
        contrast, gain = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1) * rng.uniform(0.92, 1.08, 3)
        def full(channels):
            return np.ascontiguousarray(np.broadcast_to(channels.astype(np.float32), (size, size, 3)))
        return cls(zoom, framing, full(contrast * gain), full((1 - contrast) * 128.0 * gain))

    def view(self, photo: int) -> tuple[float, float, float]:
        """The Canvas view of a photo: its crop's top-left corner and the zoom."""
        left, top = self.framing[photo] * (1 - 1 / self.zoom)
        return float(left), float(top), self.zoom

    def develop(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img, np.float32) * self.scale + self.offset


def sky(c: Canvas, look: Look, horizon: float, setting: int):
    top = (70, 130, 215) if setting != 2 else (90, 150, 220)
    c.gradient(0, horizon, top, (200, 220, 240))
    if c.rng.random() < 0.6:
        x = c.rng.uniform(0.1, 0.9)
        c.ellipse(x - 0.05, 0.05, x + 0.05, 0.15, (255, 240, 180))


def ground(c: Canvas, setting: int, horizon: float):
    color = [(225, 205, 150), (120, 120, 125), (110, 125, 95), (95, 160, 70)][setting]
    c.rect(0, horizon, 1, 1, color)


def sea(c: Canvas, y0: float, y1: float):
    c.gradient(y0, y1, (20, 90, 160), (60, 160, 200))
    for _ in range(4):
        y = c.rng.uniform(y0, y1)
        x = c.rng.uniform(0, 0.8)
        c.line(x, y, x + 0.15, y, (230, 245, 255))


def mountains(c: Canvas, base: float, snow: bool = True):
    for _ in range(3):
        x = c.rng.uniform(-0.1, 0.9)
        w = c.rng.uniform(0.3, 0.6)
        h = c.rng.uniform(0.25, 0.45)
        c.poly([(x, base), (x + w / 2, base - h), (x + w, base)], (95, 100, 115))
        if snow:
            c.poly([(x + w / 2 - w * 0.12, base - h * 0.76), (x + w / 2, base - h), (x + w / 2 + w * 0.12, base - h * 0.76)],
                   (245, 245, 250))


def skyline(c: Canvas, p, base: float):
    for _ in range(7):
        x = c.rng.uniform(0, 0.95)
        w = c.rng.uniform(0.06, 0.14)
        h = c.rng.uniform(0.15, 0.45)
        c.rect(x, base - h, x + w, base, (70, 75, 90))
        for wy in np.arange(base - h + 0.03, base - 0.02, 0.05):
            c.rect(x + 0.015, wy, x + w - 0.015, wy + 0.015, (240, 220, 130))
    if int(p["_city"]) >= 0:
        landmark(c, int(p["_city"]), c.rng.uniform(0.3, 0.7), base, 0.5)


def landmark(c: Canvas, city: int, cx: float, base: float, scale: float):
    """A city's signature silhouette: its shape parameters are fixed by the city id."""
    u = [_hash_unit(8, city, k) for k in range(5)]
    color = _rgb(u[0], 0.35, 0.5)
    h, w = scale * (0.5 + 0.5 * u[1]), scale * (0.08 + 0.2 * u[2])
    kind = int(u[3] * 4)
    if kind == 0:  # spire tower
        c.poly([(cx - w / 2, base), (cx, base - h), (cx + w / 2, base)], color)
    elif kind == 1:  # dome on a drum
        c.rect(cx - w / 2, base - h * 0.6, cx + w / 2, base, color)
        c.ellipse(cx - w / 2, base - h * 0.6 - w / 2, cx + w / 2, base - h * 0.6 + w / 2, color)
    elif kind == 2:  # arch
        c.rect(cx - w, base - h * 0.7, cx + w, base, color)
        c.ellipse(cx - w * 0.5, base - h * 0.4, cx + w * 0.5, base + h * 0.1, (200, 220, 240))
    else:  # needle with a ball
        c.rect(cx - w * 0.12, base - h, cx + w * 0.12, base, color)
        c.ellipse(cx - w / 2, base - h * (0.55 + 0.3 * u[4]), cx + w / 2, base - h * (0.55 + 0.3 * u[4]) + w, color)


def flag(c: Canvas, look: Look, x: float, y: float, w: float = 0.14):
    c.line(x, y, x, y + 0.2, (60, 60, 60))
    for k, color in enumerate(look.flag):
        if look.flag_vertical:
            c.rect(x + k * w / 3, y, x + (k + 1) * w / 3, y + w * 0.66, color)
        else:
            c.rect(x, y + k * w * 0.22, x + w, y + (k + 1) * w * 0.22, color)


def building(c: Canvas, p, look: Look, horizon: float):
    arch, size = p["_archetype"], int(p["_size"])
    floors = 1 + size
    left = c.rng.uniform(0.12, 0.25)
    if arch in ("tower", "block", "hostel"):
        top = max(0.08, horizon - 0.08 * floors)
        right = 1 - left if arch != "tower" else left + 0.35 + 0.03 * size
        wall = (225, 90, 160) if arch == "hostel" else look.wall
        c.rect(left, top, right, horizon + 0.05, wall)
        cols = 6 if arch == "block" else 4
        for fy in np.linspace(top + 0.03, horizon - 0.04, floors):
            for fx in np.linspace(left + 0.03, right - 0.08, cols):
                c.rect(fx, fy, fx + 0.05, fy + 0.04, (170, 200, 230) if look.lux > 0.4 else (120, 130, 140))
                if arch == "block" and p["_has_balcony"]:
                    c.line(fx - 0.01, fy + 0.05, fx + 0.06, fy + 0.05, (40, 40, 40), 2)
        if arch == "hostel":
            for _ in range(5):  # a low building leaves no room below its top: the lights sit at the top
                x, y = c.rng.uniform(left, right - 0.1), c.rng.uniform(top, max(top, horizon - 0.1))
                c.ellipse(x, y, x + 0.1, y + 0.1, _rgb(c.rng.random(), 0.8, 0.9))
        if p["_is_chain"]:
            c.rect(left + 0.02, top - 0.06, left + 0.2, top - 0.01, (0, 70, 160))
        flag(c, look, right - 0.05, max(0.0, top - 0.2))
    elif arch in ("house", "villa", "resort", "motel"):
        wide = arch in ("villa", "resort", "motel")
        right = 0.92 if wide else 0.72
        height = 0.18 + (0.08 if arch == "house" else 0.04) * min(size, 3)
        top = horizon - height
        c.rect(left, top, right, horizon + 0.05, look.wall)
        if arch == "motel":
            for fx in np.arange(left + 0.03, right - 0.05, 0.09):
                c.rect(fx, top + 0.08, fx + 0.05, horizon + 0.05, _rgb(0.02, 0.6, 0.6))
        elif arch == "villa":
            for fx in np.arange(left + 0.04, right - 0.08, 0.12):
                c.ellipse(fx, top + 0.04, fx + 0.08, top + 0.16, (60, 50, 45))
        else:
            c.poly([(left - 0.04, top), ((left + right) / 2, top - 0.16), (right + 0.04, top)], look.roof)
            c.rect(left + 0.05, top + 0.06, left + 0.12, top + 0.12, (170, 200, 230))
            c.rect((left + right) / 2 - 0.04, horizon - 0.1, (left + right) / 2 + 0.04, horizon + 0.05, (90, 60, 40))
        if arch == "resort":
            for fx in (0.05, 0.95):
                c.line(fx, horizon + 0.05, fx + 0.02, horizon - 0.25, (110, 80, 50), 3)
                c.ellipse(fx - 0.08, horizon - 0.3, fx + 0.1, horizon - 0.2, (40, 140, 60))
        flag(c, look, right - 0.04, top - 0.22)
    elif arch == "cabin":
        right = left + 0.5
        top = horizon - 0.22
        c.rect(left, top, right, horizon + 0.04, (125, 80, 45))
        for ly in np.arange(top + 0.03, horizon, 0.035):
            c.line(left, ly, right, ly, (90, 55, 30))
        c.poly([(left - 0.05, top), ((left + right) / 2, top - 0.18), (right + 0.05, top)], (70, 45, 35))
        flag(c, look, right + 0.06, top - 0.1)
    elif arch == "tent":
        for k in range(1 + min(size, 3)):
            x = left + 0.22 * k
            c.poly([(x, horizon + 0.05), (x + 0.1, horizon - 0.15), (x + 0.2, horizon + 0.05)],
                   _rgb(0.08 + 0.05 * k, 0.5, 0.8))
        flag(c, look, 0.85, horizon - 0.3)
    else:  # boat
        c.poly([(0.1, horizon), (0.9, horizon), (0.8, horizon + 0.12), (0.2, horizon + 0.12)], look.wall)
        c.rect(0.35, horizon - 0.12, 0.65, horizon, (240, 240, 240))
        flag(c, look, 0.7, horizon - 0.3)


def cracks(c: Canvas, look: Look, horizon: float):
    """An old facade: one crack per ~15 years, dark zigzags across the building."""
    for _ in range(int(round(look.age * 100 / 15))):
        x, y = c.rng.uniform(0.2, 0.75), c.rng.uniform(horizon - 0.3, horizon - 0.08)
        dx, dy = c.rng.uniform(-0.04, 0.04), c.rng.uniform(0.04, 0.08)
        c.line(x, y, x + dx, y + dy, (45, 40, 35), 1)
        c.line(x + dx, y + dy, x + dx * 0.2, y + 2 * dy, (45, 40, 35), 1)


def exterior(c: Canvas, p, look: Look):
    horizon = c.rng.uniform(0.6, 0.72)
    setting = int(p["_setting"])
    sky(c, look, horizon, setting)
    if setting == 2:
        mountains(c, horizon)
    ground(c, setting, horizon)
    if setting == 0 or p["_archetype"] == "boat":
        sea(c, horizon, horizon + 0.12)
    building(c, p, look, horizon)
    cracks(c, look, horizon)
    if p["_has_garden"]:
        for x in c.rng.uniform(0, 1, 4):
            c.ellipse(x - 0.05, horizon + 0.02, x + 0.05, horizon + 0.12, (40, 130, 50))
    if p["_has_pool"] and c.rng.random() < 0.5:
        c.rect(0.15, 0.86, 0.7, 0.96, (60, 200, 220))
    if look.signature:  # a parasol in front
        c.line(0.88, 0.8, 0.88, 0.97, (70, 60, 50), 2)
        c.poly([(0.78, 0.82), (0.88, 0.74), (0.98, 0.82)], look.signature)


def window_view(c: Canvas, p, x0, y0, x1, y1):
    """What the window shows: the property's view, in miniature."""
    c.rect(x0, y0, x1, y1, (170, 205, 235))
    mid = (y0 + y1) / 2
    if p["_sea_view"]:
        c.rect(x0, mid, x1, y1, (30, 110, 180))
    elif p["_mountain_view"]:
        c.poly([(x0, y1), ((x0 + x1) / 2, y0 + 0.02), (x1, y1)], (100, 105, 120))
    elif p["_city_view"]:
        for k in range(4):
            bx = x0 + (x1 - x0) * k / 4
            c.rect(bx, mid - 0.05 * (k % 3), bx + (x1 - x0) / 5, y1, (80, 85, 100))
    else:
        c.rect(x0, mid, x1, y1, (90, 160, 70))
    c.line(x0, y0, x1, y0, (240, 240, 240), 2)
    c.line((x0 + x1) / 2, y0, (x0 + x1) / 2, y1, (240, 240, 240), 2)


def decor(c: Canvas, look: Look, wall_bottom: float):
    """The decor style on a wall: a plain panel (minimalist), wooden beams (rustic), striped wallpaper
    (classic) or big leaves (tropical)."""
    if look.decor == 0:
        c.rect(0.05, 0.05, 0.5, 0.32, (245, 245, 242))
    elif look.decor == 1:
        for y in (0.04, wall_bottom * 0.45, wall_bottom - 0.04):
            c.rect(0, y, 1, y + 0.035, (105, 70, 40))
    elif look.decor == 2:
        for x in np.arange(0.0, 1.0, 0.07):
            c.rect(x, 0, x + 0.025, wall_bottom, (150, 40, 60))
    else:
        for x, y in ((0.02, 0.02), (0.8, 0.04), (0.4, wall_bottom - 0.2)):
            c.ellipse(x, y, x + 0.18, y + 0.14, (30, 140, 60))
            c.line(x + 0.02, y + 0.07, x + 0.16, y + 0.07, (20, 90, 40), 2)


def room(c: Canvas, p, look: Look):
    c.rect(0, 0, 1, 0.62, look.interior)
    decor(c, look, 0.62)
    c.rect(0, 0.62, 1, 1, look.floor)
    window_view(c, p, 0.6, 0.12, 0.92, 0.42)
    if look.signature:  # curtains
        c.rect(0.55, 0.08, 0.6, 0.5, look.signature)
        c.rect(0.92, 0.08, 0.97, 0.5, look.signature)
    beds = 3 if p["_archetype"] == "hostel" else 1
    for k in range(beds):
        x = 0.05 + k * 0.2 if beds > 1 else 0.1
        w = 0.18 if beds > 1 else 0.25 + 0.25 * look.lux
        c.rect(x, 0.55, x + w, 0.78, (240, 240, 235))
        c.rect(x, 0.5, x + w, 0.56, look.accent)
        if beds > 1:
            c.rect(x, 0.3, x + w, 0.4, (235, 235, 230))
    for k in range(int(1 + 3 * look.lux)):  # art on the walls in nicer places
        c.rect(0.08 + 0.12 * k, 0.15, 0.16 + 0.12 * k, 0.27, _rgb(c.rng.random(), 0.6, 0.7))
    if look.lux > 0.5:
        c.rect(0.5, 0.42, 0.53, 0.6, look.accent)
        c.ellipse(0.46, 0.34, 0.57, 0.44, (250, 230, 170))
    if p["_has_kitchen"] and c.rng.random() < 0.4:
        kitchenette(c, 0.62, 0.5, 0.98)
    if p["_has_balcony"] and c.rng.random() < 0.5:
        for x in np.arange(0.6, 0.93, 0.04):
            c.line(x, 0.34, x, 0.42, (40, 40, 40))


def kitchenette(c: Canvas, x0, y0, x1):
    c.rect(x0, y0, x1, y0 + 0.2, (200, 200, 205))
    c.ellipse(x0 + 0.03, y0 + 0.02, x0 + 0.1, y0 + 0.07, (30, 30, 30))
    c.ellipse(x0 + 0.12, y0 + 0.02, x0 + 0.19, y0 + 0.07, (30, 30, 30))


def kitchen(c: Canvas, p, look: Look):
    c.rect(0, 0, 1, 1, look.interior)
    c.rect(0, 0.1, 1, 0.35, (170, 130, 90) if look.lux > 0.5 else (215, 215, 210))
    c.rect(0, 0.55, 1, 1, (190, 190, 195))
    kitchenette(c, 0.05, 0.55, 0.5)
    c.rect(0.75, 0.2, 0.95, 0.95, (230, 230, 235))  # fridge
    c.line(0.78, 0.45, 0.92, 0.45, (150, 150, 150))
    if look.signature:  # a tea towel on the oven, a kettle
        c.rect(0.2, 0.6, 0.3, 0.75, look.signature)
        c.ellipse(0.55, 0.45, 0.68, 0.56, look.signature)


def view(c: Canvas, p, look: Look):
    horizon = c.rng.uniform(0.45, 0.6)
    sky(c, look, horizon, int(p["_setting"]))
    if p["_sea_view"]:
        sea(c, horizon, 1)
    elif p["_mountain_view"]:
        mountains(c, horizon + 0.15)
        ground(c, 3, horizon + 0.15)
    elif p["_city_view"]:
        ground(c, 1, horizon)
        skyline(c, p, horizon)
    else:
        ground(c, 3, horizon)
        for x in c.rng.uniform(0, 1, 3):
            c.ellipse(x - 0.2, horizon - 0.05, x + 0.2, horizon + 0.1, (70, 140, 60))
    if p["_has_balcony"]:
        c.rect(0, 0.8, 1, 0.83, (50, 50, 50))
        for x in np.arange(0.02, 1, 0.06):
            c.line(x, 0.8, x, 1, (50, 50, 50), 2)


def pool(c: Canvas, p, look: Look):
    horizon = 0.35
    sky(c, look, horizon, int(p["_setting"]))
    if p["_sea_view"] and look.lux > 0.5:
        sea(c, horizon, 0.45)  # infinity edge
    c.rect(0, 0.45 if p["_sea_view"] else horizon, 1, 1, (225, 220, 205))
    c.poly([(0.2, 0.5), (0.8, 0.5), (0.95, 0.85), (0.05, 0.85)], (50, 190, 215))
    for k in range(1, 4):
        c.line(0.2 + 0.15 * k, 0.5, 0.05 + 0.225 * k, 0.85, (200, 240, 250))
    for x in (0.05, 0.85):
        c.rect(x, 0.88, x + 0.1, 0.93, (245, 245, 245) if look.lux > 0.5 else (90, 150, 200))
        c.poly([(x - 0.03, 0.7), (x + 0.05, 0.6), (x + 0.13, 0.7)], look.accent)
        if look.signature:  # a towel on each lounger
            c.rect(x + 0.02, 0.875, x + 0.07, 0.935, look.signature)


def beach(c: Canvas, p, look: Look):
    sky(c, look, 0.4, 0)
    sea(c, 0.4, 0.6)
    c.rect(0, 0.6, 1, 1, (232, 210, 160))
    for x in c.rng.uniform(0.05, 0.85, 3):
        c.line(x + 0.05, 0.65, x + 0.05, 0.85, (90, 70, 50))
        c.poly([(x - 0.04, 0.67), (x + 0.05, 0.58), (x + 0.14, 0.67)], _rgb(c.rng.random(), 0.7, 0.9))
        c.rect(x, 0.88, x + 0.12, 0.92, _rgb(c.rng.random(), 0.6, 0.9))


def bar(c: Canvas, p, look: Look):
    c.rect(0, 0, 1, 1, (60, 40, 35) if look.lux > 0.4 else (90, 80, 70))
    for shelf in (0.15, 0.3):
        c.line(0.05, shelf + 0.1, 0.95, shelf + 0.1, (140, 100, 60), 2)
        for x in np.arange(0.08, 0.92, 0.06):
            c.rect(x, shelf, x + 0.03, shelf + 0.1, _rgb(c.rng.random(), 0.7, 0.8))
    c.rect(0, 0.55, 1, 0.7, look.accent)
    c.rect(0, 0.7, 1, 1, (40, 30, 25))
    for x in np.arange(0.1, 0.95, 0.2):
        c.ellipse(x, 0.78, x + 0.08, 0.84, look.signature or (180, 40, 40))
        c.line(x + 0.04, 0.84, x + 0.04, 0.98, (120, 120, 120), 2)


def garden(c: Canvas, p, look: Look):
    sky(c, look, 0.4, 3)
    c.rect(0, 0.4, 1, 1, (80, 165, 70))
    for x in c.rng.uniform(0, 1, 4):
        c.rect(x - 0.015, 0.3, x + 0.015, 0.5, (100, 70, 40))
        c.ellipse(x - 0.1, 0.15, x + 0.1, 0.38, (35, 120, 45))
    for _ in range(12):
        x, y = c.rng.uniform(0, 1), c.rng.uniform(0.55, 0.95)
        c.ellipse(x - 0.015, y - 0.015, x + 0.015, y + 0.015, _rgb(c.rng.choice([0.0, 0.15, 0.85]), 0.8, 1.0))
    if p["_picnic_area"]:
        c.rect(0.35, 0.7, 0.7, 0.75, (140, 95, 55))
        c.line(0.38, 0.75, 0.38, 0.85, (140, 95, 55), 2)
        c.line(0.67, 0.75, 0.67, 0.85, (140, 95, 55), 2)
        c.rect(0.3, 0.8, 0.75, 0.82, (140, 95, 55))


def gym(c: Canvas, p, look: Look):
    c.rect(0, 0, 1, 0.6, (200, 205, 210))
    c.rect(0, 0.6, 1, 1, (50, 50, 55))
    c.rect(0, 0.1, 1, 0.4, (150, 170, 190))  # mirror wall
    for x in np.arange(0.08, 0.6, 0.1):  # dumbbell rack
        c.rect(x, 0.62, x + 0.06, 0.66, (30, 30, 30))
        c.rect(x + 0.02, 0.64, x + 0.04, 0.7, (120, 120, 120))
    c.poly([(0.65, 0.95), (0.95, 0.95), (0.95, 0.85), (0.7, 0.8)], (40, 40, 45))  # treadmill
    c.line(0.9, 0.85, 0.92, 0.5, (90, 90, 90), 3)
    c.rect(0.85, 0.45, 0.97, 0.52, (20, 20, 20))
    if look.signature:  # a yoga mat
        c.rect(0.08, 0.8, 0.5, 0.88, look.signature)


def lounge(c: Canvas, p, look: Look):
    c.rect(0, 0, 1, 0.6, look.interior)
    decor(c, look, 0.6)
    c.rect(0, 0.6, 1, 1, look.floor)
    c.rect(0.2, 0.72, 0.8, 0.9, _rgb(0.6 + 0.3 * look.lux, 0.4, 0.6))  # rug
    for x in (0.03, 0.6):
        c.rect(x, 0.55, x + 0.37, 0.75, look.accent)
        c.rect(x, 0.48, x + 0.37, 0.56, (90, 60, 50))
        if look.signature:  # cushions
            c.rect(x + 0.04, 0.5, x + 0.13, 0.6, look.signature)
            c.rect(x + 0.24, 0.5, x + 0.33, 0.6, look.signature)
    c.rect(0.42, 0.7, 0.58, 0.76, (70, 45, 30))
    c.rect(0.9, 0.45, 0.96, 0.6, (150, 100, 60))
    c.ellipse(0.85, 0.3, 1.0, 0.48, (40, 130, 55))


def hiking(c: Canvas, p, look: Look):
    sky(c, look, 0.45, 2)
    mountains(c, 0.6, snow=int(p["_setting"]) == 2)
    c.rect(0, 0.6, 1, 1, (90, 140, 70))
    c.poly([(0.45, 0.6), (0.55, 0.6), (0.8, 1.0), (0.2, 1.0)], (170, 140, 100))
    c.line(0.75, 0.75, 0.75, 0.95, (100, 70, 40), 3)
    c.rect(0.7, 0.72, 0.85, 0.78, (200, 150, 60))


def landmark_scene(c: Canvas, p, look: Look):
    sky(c, look, 0.8, 1)
    ground(c, 1, 0.8)
    landmark(c, int(p["_city"]), c.rng.uniform(0.4, 0.6), 0.8, 0.75)


def spa(c: Canvas, p, look: Look):
    """A hot tub on stone tiles, steam rising, towels folded beside it."""
    c.rect(0, 0, 1, 1, (205, 200, 190))
    for y in np.arange(0.1, 1.0, 0.12):
        c.line(0, y, 1, y, (170, 165, 155))
    c.ellipse(0.15, 0.45, 0.85, 0.9, (90, 90, 95))
    c.ellipse(0.2, 0.5, 0.8, 0.85, (70, 200, 210))
    for x in (0.35, 0.5, 0.65):
        c.line(x, 0.4, x - 0.03, 0.25, (250, 250, 250), 2)
        c.line(x - 0.03, 0.25, x + 0.01, 0.1, (250, 250, 250), 2)
    c.rect(0.82, 0.2, 0.97, 0.3, look.signature or (250, 250, 250))
    c.rect(0.82, 0.3, 0.97, 0.38, look.accent)


RENDERERS = {"exterior": exterior, "room": room, "view": view, "pool": pool, "beach": beach, "bar": bar,
             "garden": garden, "gym": gym, "lounge": lounge, "kitchen": kitchen, "hiking": hiking,
             "landmark": landmark_scene, "spa": spa}


def gallery_scenes(p, n_images: int, rng: np.random.Generator) -> list[str]:
    """Which photos a listing shows: an exterior, rooms, then its amenities and views (some omitted)."""
    amenities = [scene for scene, present in (
        ("pool", p["_has_pool"]), ("bar", p["_has_bar"]), ("garden", p["_has_garden"] or p["_picnic_area"]),
        ("gym", p["_fitness_center"]), ("lounge", p["_communal_lounge"]), ("kitchen", p["_has_kitchen"]),
        ("beach", p["_beach_access"]), ("hiking", p["_hiking"]),
        ("view", p["_sea_view"] or p["_mountain_view"] or p["_city_view"]), ("landmark", int(p["_city"]) >= 0),
        ("spa", p["_spa"]),
    ) if present and rng.random() < 0.85]
    rng.shuffle(amenities)
    scenes = ["exterior", "room"] + amenities
    while len(scenes) < n_images:
        scenes.append(str(rng.choice(["room", "exterior", "room", "view"])))
    scenes = scenes[:n_images]
    rng.shuffle(scenes)
    return scenes


def render(scene: str, p, look: Look, size: int, rng: np.random.Generator,
           camera: Camera | None = None, photo: int = 0) -> Image.Image:
    """One photo: draw at the target size, then the listing's camera (if any: crop and zoom, light, colour
    cast) and the photo's own effects (flip, exposure, noise, wear)."""
    c = Canvas(size, rng, None if camera is None else camera.view(photo))
    RENDERERS[scene](c, p, look)
    a = np.asarray(c.img, dtype=np.float32) if camera is None else camera.develop(c.img)
    a = yellowed(a, AGE_CAST * look.age)  # an old building's photos: their hues turned toward ochre
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = a * rng.uniform(0.8, 1.15) + rng.normal(0, 4 + 20 * look.wear, size=a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
