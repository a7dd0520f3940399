"""Metric-learning ground truth of the synthetic catalogue (docs/design.md §9): re-listings and co-views.

Re-listings: a share (SynthSettings.relisted_share) of the galleries are listings of a property listed
2-3 times, all in one split (unless relisted_across_splits); the rest are listed once. A re-listing
copies its property's latents and labels (the labels are the property's record, listed again) and is
photographed again: its own choice and order of scenes, and its own camera (crop and zoom, brightness,
contrast, colour cast; render.Camera), so it is never a pixel copy. The manifest's `property_id` names
the property.

Co-views: each property has a taste; two galleries are co-viewed more often the closer their tastes. Part
of the taste is read by MTL tasks (luxury, setting, region, building archetype); part is a latent of its
own, a hue no task reads but the photos show (render.Look.signature: curtains, cushions, towels, a
parasol...). Sessions start at a gallery drawn by popularity (Zipf-like, a floor of uniform browsing); the
partner is one of CANDIDATES popular galleries drawn at random, picked with probability ~
exp(taste similarity / TEMPERATURE), or, in a share NOISE of the sessions, any popular gallery. The
co-views of each unordered pair are counted: that is its weight. Time O(sessions x CANDIDATES) and memory
O(galleries + a chunk of sessions): no galleries x galleries matrix.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gallery.data.synth.attributes import TYPES

# re-listings: the share of groups of three among groups (the rest are pairs)
GROUP_OF_THREE = 0.4
# taste similarity: the weight of each part (the hue is the part no task reads)
TASTE_WEIGHTS = {"luxury": 1.0, "setting": 0.6, "region": 0.4, "archetype": 0.4, "hue": 0.9}
ARCHETYPES = sorted({t[1] for t in TYPES})
# co-views
SESSIONS_PER_GALLERY = 3.0   # co-view events drawn, per gallery
CANDIDATES = 256             # galleries a session's partner is picked among
TEMPERATURE = 0.1            # of the softmax over the candidates' taste similarity
NOISE = 0.05                 # share of sessions whose partner ignores taste
ZIPF = 0.9                   # popularity ~ rank^-ZIPF (continuous, bounded) ...
UNIFORM_BROWSING = 0.3       # ... mixed with this share of uniform draws: every gallery is seen sometimes
CHUNK = 1 << 15              # sessions scored at once (CHUNK x CANDIDATES similarities)


def relisting_groups(split: np.ndarray, share: float, seed: int, across_splits: bool = False) -> np.ndarray:
    """Per gallery, the row of its property's first listing (itself for a property listed once): in each
    split, a share `share` of its galleries (at least one group where `share` > 0 and the split has two)
    in groups of 2-3. Groups never cross splits (no property is both trained on and evaluated) unless
    `across_splits`: then the groups are drawn from all galleries at once."""
    rng = np.random.default_rng([seed, 4])
    source = np.arange(len(split))
    pools = ([np.arange(len(split))] if across_splits
             else [np.flatnonzero(split == name) for name in ("train", "valid", "test")])
    for pool in pools:
        rows = rng.permutation(pool)
        grouped = int(round(share * len(rows)))
        if share > 0 and len(rows) >= 2:
            grouped = max(grouped, 2)
        sizes = np.where(rng.random(grouped // 2 + 1) < GROUP_OF_THREE, 3, 2)
        sizes = sizes[:np.searchsorted(np.cumsum(sizes), grouped, side="right")]
        left = grouped - sizes.sum()
        if left == 1 and len(sizes):  # one gallery left over: a pair takes it, or a three gives one up
            twos = np.flatnonzero(sizes == 2)
            if len(twos):
                sizes[twos[-1]] = 3
            else:
                sizes[-1] = 2
            left = grouped - sizes.sum()
        if left >= 2:
            sizes = np.append(sizes, left)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        for start, size in zip(starts, sizes):
            source[rows[start:start + size]] = rows[start:start + size].min()
    return source


def relist(props: pd.DataFrame, source: np.ndarray) -> pd.DataFrame:
    """Each gallery's row: its property's (latents and labels copied from the property's first listing)."""
    out = props.iloc[source].reset_index(drop=True)
    out.insert(0, "property_id", [f"prop_{s:06d}" for s in source])
    return out


def taste_hues(n: int, seed: int) -> np.ndarray:
    """The taste's own latent (radians): read by no task, drawn as the signature colour of a property."""
    return np.random.default_rng([seed, 5]).uniform(0.0, 2 * np.pi, n)


def taste_parts(props: pd.DataFrame) -> dict[str, np.ndarray]:
    """The latents the taste reads, per gallery."""
    arch = pd.Categorical(props["_archetype"], categories=ARCHETYPES).codes
    return {"luxury": props["_luxury"].to_numpy(np.float32), "setting": props["_setting"].to_numpy(np.int16),
            "region": props["_region"].to_numpy(np.int16), "archetype": np.asarray(arch, np.int16),
            "hue": props["_taste_hue"].to_numpy(np.float32)}


def taste_similarity(parts: dict[str, np.ndarray], a, b, which=tuple(TASTE_WEIGHTS)) -> np.ndarray:
    """Taste similarity of galleries a and b (row indices, any broadcastable shapes): a weighted sum of
    cos(pi * luxury difference), same setting, same region, same archetype and cos(hue difference);
    `which` picks parts (e.g. ("hue",) for the part no task reads)."""
    w = TASTE_WEIGHTS
    total = np.zeros(np.broadcast_shapes(np.shape(a), np.shape(b)), np.float32)
    if "luxury" in which:
        total += w["luxury"] * np.cos(np.pi * (parts["luxury"][a] - parts["luxury"][b]))
    if "hue" in which:
        total += w["hue"] * np.cos(parts["hue"][a] - parts["hue"][b])
    for key in ("setting", "region", "archetype"):
        if key in which:
            total += w[key] * (parts[key][a] == parts[key][b])
    return total


class Popularity:
    """Zipf-like popularity over a random order of the galleries, mixed with uniform browsing; draws in O(1)."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.order = rng.permutation(n)  # order[r]: the gallery of popularity rank r
        self.span = (n + 1.0) ** (1 - ZIPF) - 1

    def draw(self, size) -> np.ndarray:
        u, uniform = self.rng.random(size), self.rng.random(size) < UNIFORM_BROWSING
        rank = np.floor((1 + u * self.span) ** (1 / (1 - ZIPF))).astype(np.int64) - 1  # inverse CDF of rank^-ZIPF
        return np.where(uniform, np.minimum((u * self.n).astype(np.int64), self.n - 1),
                        self.order[np.clip(rank, 0, self.n - 1)])


def co_views(props: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Co-viewed pairs as rows (a < b, sorted) and their weights (co-view counts)."""
    n = len(props)
    rng = np.random.default_rng([seed, 6])
    parts = taste_parts(props)
    popularity = Popularity(n, rng)
    sessions = int(round(SESSIONS_PER_GALLERY * n))
    a, b = popularity.draw(sessions), popularity.draw(sessions)  # b: the partner of a noise session
    by_taste = np.flatnonzero(rng.random(sessions) >= NOISE)
    for start in range(0, len(by_taste), CHUNK):
        rows = by_taste[start:start + CHUNK]
        candidates = popularity.draw((len(rows), CANDIDATES))
        seeds = a[rows][:, None]
        logits = taste_similarity(parts, seeds, candidates) / TEMPERATURE
        logits[candidates == seeds] = -np.inf
        pick = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)  # a softmax draw (Gumbel-max)
        b[rows] = candidates[np.arange(len(rows)), pick]
    keep = a != b
    low, high = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    keys, counts = np.unique(low * n + high, return_counts=True)
    return keys // n, keys % n, counts.astype(np.float64)
