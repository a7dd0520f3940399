"""Latent factors of synthetic accommodations and the Table 1 labels derived from them.

A property has a place (region -> country -> city), a type, a setting (beach, city, mountain,
countryside), a size and a luxury level; amenities follow from those. Labels are noisy readings
of the latents with realistic missingness (docs/synthetic-catalogue.md lists which latents each
label reads). The held-out tasks test transfer two ways: the star rating depends on luxury and
type, which several MTL tasks share (segment, review score, daily rate, pool, fitness...), so
learning the MTL tasks should help predict it; a spa (rare), the decor style and the building's
age are latents of their own, drawn in the photos but read by no MTL task, so only an embedding
that keeps what the photos show, beyond what it was taught, can predict them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

REGIONS = ["africa", "asia", "caribbean", "middle_east", "north_america", "northern_europe",
           "oceania", "south_america", "southern_europe"]
# P(setting | region): beach, city, mountain, countryside
SETTINGS = ["beach", "city", "mountain", "countryside"]
REGION_SETTINGS = np.array([[.35, .25, .15, .25], [.25, .45, .15, .15], [.70, .10, .05, .15],
                            [.30, .50, .10, .10], [.20, .45, .20, .15], [.10, .40, .25, .25],
                            [.50, .25, .10, .15], [.30, .35, .20, .15], [.40, .30, .10, .20]])
# name, building archetype, hotel-like (has stars, segment), vacation rental, luxury shift
TYPES = [
    ("hotel", "tower", True, False, 0.0), ("apartment", "block", False, True, -0.05),
    ("bnb", "house", False, False, -0.1), ("holiday_home", "house", False, True, 0.0),
    ("resort", "resort", True, False, 0.25), ("hostel", "hostel", True, False, -0.35),
    ("guesthouse", "house", False, False, -0.15), ("villa", "villa", False, True, 0.25),
    ("motel", "motel", True, False, -0.25), ("boutique_hotel", "tower", True, False, 0.2),
    ("cabin", "cabin", False, True, -0.05), ("aparthotel", "block", True, False, 0.0),
    ("chalet", "cabin", False, True, 0.15), ("inn", "house", True, False, -0.1),
    ("lodge", "cabin", True, False, 0.05), ("campsite", "tent", False, False, -0.3),
    ("farm_stay", "house", False, False, -0.1), ("capsule_hotel", "tower", True, False, -0.2),
    ("riad", "villa", True, False, 0.1), ("ryokan", "house", True, False, 0.15),
    ("bungalow", "resort", False, True, 0.05), ("homestay", "house", False, False, -0.2),
    ("country_house", "villa", False, True, 0.1), ("boat", "boat", False, True, 0.0),
    ("treehouse", "cabin", False, True, 0.05), ("castle", "villa", True, False, 0.35),
    ("tented_camp", "tent", True, False, 0.1), ("love_hotel", "tower", True, False, -0.1),
]
SEGMENTS = ["budget", "economy", "midscale", "upscale", "upper_upscale", "luxury"]
RENTAL_TYPES = ["apartment", "house", "villa", "cabin", "cottage", "studio"]
SIZE_BUCKETS = ["1", "2-4", "5-9", "10-19", "20-49", "50-99", "100-199", "200-499", "500+"]
DECOR_STYLES = ["minimalist", "rustic", "classic", "tropical"]


def cardinalities(n: int) -> dict[str, int]:
    """Table 1 cardinalities scaled to the catalogue size (full size at 520k products)."""
    return {
        "country": int(np.clip(n // 25, 12, 107)),
        "city": int(np.clip(n // 30, 6, 1981)),
        "property_type": int(np.clip(n // 90, 8, 28)),
    }


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def sample_properties(n: int, seed: int) -> pd.DataFrame:
    """Latents (prefixed `_`) and labels of n accommodations; deterministic in (n, seed)."""
    rng = np.random.default_rng([seed, 0])
    card = cardinalities(n)
    n_types = card["property_type"]

    # place: cities belong to countries, countries to regions
    country_region = np.arange(card["country"]) % len(REGIONS)
    city_country = rng.integers(0, card["country"], card["city"])
    region = rng.integers(0, len(REGIONS), n)
    country = np.array([rng.choice(np.flatnonzero(country_region == r)) for r in region])
    setting = np.array([rng.choice(4, p=REGION_SETTINGS[r]) for r in region])
    is_city = setting == 1
    # top-destination cities: city properties in a country that has cities (popular ones more often)
    city = np.full(n, -1)
    for i in np.flatnonzero(is_city):
        options = np.flatnonzero(city_country == country[i])
        if len(options):
            weights = 1.0 / (1.0 + np.arange(len(options)))
            city[i] = rng.choice(options, p=weights / weights.sum())

    # type: beach/mountain settings favour resorts, villas and cabins
    type_weights = np.ones((4, n_types))
    for t, (_, arch, *_rest) in enumerate(TYPES[:n_types]):
        type_weights[0, t] += 2.0 * (arch in ("resort", "villa", "boat"))
        type_weights[1, t] += 2.0 * (arch in ("tower", "block", "hostel"))
        type_weights[2, t] += 2.5 * (arch in ("cabin", "tent"))
        type_weights[3, t] += 2.0 * (arch in ("house", "villa", "tent"))
    type_weights /= type_weights.sum(1, keepdims=True)
    ptype = np.array([rng.choice(n_types, p=type_weights[s]) for s in setting])
    hotel_like = np.array([TYPES[t][2] for t in ptype])
    rental = np.array([TYPES[t][3] for t in ptype])
    region_wealth = np.linspace(-0.1, 0.15, len(REGIONS))[rng.permutation(len(REGIONS))]
    luxury = np.clip(rng.beta(2.2, 2.2, n) + np.array([TYPES[t][4] for t in ptype]) + region_wealth[region], 0.0, 1.0)
    size = np.clip(np.round(np.where(rental, 0.6, 3.2) + 2.5 * hotel_like * luxury + rng.normal(0, 1.0, n)), 0, 8).astype(int)

    def flip(p):  # a Bernoulli draw: the true amenity
        return rng.random(n) < p

    s = [setting == k for k in range(4)]
    truth = {
        "is_chain": flip(hotel_like * _sigmoid(-2.2 + 0.5 * size + 1.0 * s[1])),
        "is_vacation_rental": rental.copy(),
        "sea_view": flip(0.75 * s[0] + 0.04),
        "city_view": flip(0.65 * s[1] + 0.03),
        "mountain_view": flip(0.75 * s[2] + 0.06 * s[3]),
        "block_of_flats": flip(np.isin(ptype, [1, 11]) * 0.75 + 0.03),
        "has_balcony": flip(0.15 + 0.35 * luxury + 0.2 * (s[0] | s[2])),
        "has_kitchen": flip(np.where(rental, 0.9, 0.12)),
        "has_bar": flip(hotel_like * _sigmoid(-1.0 + 2.5 * luxury + 0.3 * size)),
        "has_garden": flip(0.12 + 0.55 * s[3] + 0.2 * luxury * ~s[1]),
        "beach_access": flip(0.55 * s[0] + 0.01),
        "picnic_area": flip(0.25 * (s[2] | s[3]) + 0.01),
        "communal_lounge": flip(0.1 + 0.5 * np.isin(ptype, [5, 4, 0]) * hotel_like),
        "hiking": flip(0.75 * s[2] + 0.2 * s[3] + 0.01),
        "has_pool": flip(_sigmoid(-3.0 + 3.2 * luxury + 1.3 * s[0] + 0.2 * size)),
        "fitness_center": flip(hotel_like * _sigmoid(-4.2 + 3.5 * luxury + 0.35 * size)),
        "city_center": flip(s[1] * 0.55),
    }

    distance = np.where(s[1], np.exp(rng.normal(0.0, 0.7, n)) * np.where(truth["city_center"], 0.4, 2.5),
                        np.exp(rng.normal(np.select(s, [2.0, 0.5, 3.0, 2.6]), 0.5)))
    n_images_bias = luxury  # richer listings carry more photos; content score reads that
    review = np.clip(6.3 + 2.8 * luxury + rng.normal(0, 0.6, n), 1.0, 10.0)
    adr = np.exp(3.7 + 1.7 * luxury + 0.08 * size + 0.4 * region_wealth[region] + 0.2 * s[0] + rng.normal(0, 0.25, n))
    location = np.clip(7.2 + 1.6 * truth["city_center"] + 0.9 * truth["beach_access"] - 0.05 * distance
                       + rng.normal(0, 0.5, n), 1.0, 10.0)
    content = np.clip(0.35 + 0.45 * n_images_bias + rng.normal(0, 0.08, n), 0.0, 1.0)
    window = np.exp(2.8 + 0.5 * s[0] + 0.4 * luxury + 0.3 * rental + rng.normal(0, 0.4, n))
    stay = 1.3 + 2.5 * rental + 1.6 * s[0] + 0.8 * s[2] + rng.gamma(2.0, 0.4, n)

    # labels: noisy readings of the truth, missing at realistic rates
    def observed(values, missing_rate, flip_rate=0.0):
        values = np.asarray(values, dtype=object).copy()
        if flip_rate:
            flips = rng.random(n) < flip_rate
            values[flips] = ~values[flips].astype(bool)
        values[rng.random(n) < missing_rate] = None
        return values

    labels = {
        "city": np.array([f"city_{c:04d}" if c >= 0 else None for c in city], dtype=object),
        "world_region": observed([REGIONS[r] for r in region], 0.0),
        "country": observed([f"country_{c:03d}" for c in country], 0.01),
        "property_type": observed([TYPES[t][0] for t in ptype], 0.0),
        "size_bucket": observed([SIZE_BUCKETS[k] for k in size], 0.05),
        "hotel_segment": np.array([SEGMENTS[int(np.clip(l * 6 + rng.normal(0, .4), 0, 5))] if h else None
                                   for l, h in zip(luxury, hotel_like)], dtype=object),
        "vacation_rental_type": np.array([RENTAL_TYPES[(t * 7 + int(l * 2)) % 6] if r else None
                                          for t, l, r in zip(ptype, luxury, rental)], dtype=object),
    }
    for name, values in truth.items():
        labels[name] = observed(values, 0.0 if name == "is_vacation_rental" else 0.08, flip_rate=0.02)
    for name, values, missing in (("distance_to_center_km", distance, 0.05), ("review_score", review, 0.12),
                                  ("avg_daily_rate_eur", adr, 0.06), ("location_score", location, 0.12),
                                  ("content_score", content, 0.0), ("booking_window_days", window, 0.1),
                                  ("length_of_stay_days", stay, 0.1)):
        labels[name] = np.where(rng.random(n) < missing, np.nan, np.round(values, 3))
    stars = np.clip(np.round(0.6 + 4.2 * luxury + 0.35 * (size - 4) / 4 + rng.normal(0, 0.45, n)), 1, 5)
    # hotels almost always carry stars, B&Bs and guesthouses sometimes, rentals rarely: about half in all
    labels["star_rating"] = np.where(rng.random(n) < np.where(hotel_like, 0.92, np.where(rental, 0.1, 0.6)), stars, np.nan)

    # held-out latents no MTL task reads, from a stream of their own (the labels above stay as they were).
    # Calibrated so that no arm solves them (docs/design.md §9): a spa in about a quarter of the listings,
    # its scene not always shown; 4% of spa labels flipped, 6% of decor labels another style, the age
    # read with a 15-year error: a perfect model scores at most ~0.96 / ~0.94 accuracy, an MSE of ~21%
    # of the label's variance
    own = np.random.default_rng([seed, 3])
    spa = own.random(n) < 0.12 + 0.25 * luxury
    decor = own.integers(0, len(DECOR_STYLES), n)
    age = own.uniform(0.0, 100.0, n)
    spa_missing, decor_missing, age_missing = own.random(n) < 0.05, own.random(n) < 0.1, own.random(n) < 0.1
    age_read = np.round(np.clip(age + own.normal(0, 15.0, n), 0, None), 1)
    spa_read = spa ^ (own.random(n) < 0.04)
    decor_read = np.where(own.random(n) < 0.06, (decor + own.integers(1, len(DECOR_STYLES), n)) % len(DECOR_STYLES), decor)
    labels["has_spa"] = np.where(spa_missing, None, spa_read).astype(object)
    labels["decor_style"] = np.where(decor_missing, None, np.array(DECOR_STYLES, dtype=object)[decor_read])
    labels["building_age_years"] = np.where(age_missing, np.nan, age_read)

    frame = pd.DataFrame(labels)
    for col in ("star_rating",):
        frame[col] = frame[col].astype("Int64")
    latents = pd.DataFrame({
        "_region": region, "_country": country, "_city": city, "_setting": setting, "_type": ptype,
        "_archetype": [TYPES[t][1] for t in ptype], "_luxury": luxury, "_size": size, "_hotel": hotel_like,
        "_stars": stars, "_spa": spa, "_decor": decor, "_age": age,
    })
    for name, values in truth.items():
        latents[f"_{name}"] = values
    return pd.concat([latents, frame], axis=1)
