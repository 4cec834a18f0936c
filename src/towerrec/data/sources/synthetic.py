"""A seeded synthetic shop, the built-in default dataset, whose signal partly lives in the images.

Every item has a category (exposed as metadata) and visual attributes (shape, colour, pattern) that
appear only in its rendered image. Users have a visual taste (two colours, one pattern) and a few
preferred categories. Purchase sequences follow category complements ("camera" -> "camera bag"),
so a sequence encoder has transitions to learn, and the item within a category mostly matches the
user's taste, so an item tower that sees the image can beat one that sees only metadata. A fraction
of items is released late and boosted, which gives a temporal split a real cold-item test set.

Everything is vectorised over items, users and interactions. Purchases are drawn for users in
chunks of about :data:`CHUNK_INTERACTIONS`, each chunk from its own random stream, so memory stays
bounded at any size; given the build's DuckDB connection (``con``) each chunk goes straight into the
engine, and 100M purchases never sit in pandas at once. The chunks depend only on the arguments, so
the same arguments always give identical interactions, with or without ``con``, and byte-identical
images.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from towerrec.data.engine import append_frame
from towerrec.data.schema import RawDataset

# Complementary neighbours form pairs: after a "camera" a "camera bag" is likely, and back.
CATEGORY_NAMES = [
    "camera", "camera bag",
    "tent", "sleeping bag",
    "sneakers", "socks",
    "dress", "handbag",
    "jacket", "scarf",
    "sunglasses", "sun hat",
]  # fmt: skip
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
COLOURS = ["red", "orange", "yellow", "green", "teal", "blue", "purple", "black"]
PALETTE = np.array(
    [(214, 39, 40), (255, 127, 14), (235, 200, 30), (44, 160, 44),
     (23, 170, 170), (31, 80, 200), (148, 60, 189), (35, 35, 35)],
    dtype=np.float64,
)  # fmt: skip
PATTERNS = ["solid", "stripes", "dots", "checks"]

START = np.datetime64("2024-01-01T00:00:00", "ns")
SECONDS_PER_DAY = 86_400

MIN_HISTORY = 3  # purchases per user, at least
LENGTH_SIGMA = 0.9  # lognormal spread of history lengths around the mean
SIGNUP_SPAN = 0.6  # users start buying within the first 60% of the period
N_PREFERRED_CATEGORIES = 3
P_COMPLEMENT = 0.5  # next category is the complement of the previous one
P_TASTE = 0.8  # the item matches the user's colour and pattern
P_PRIMARY_COLOUR = 0.7  # of the two preferred colours
ZIPF_ALPHA = 0.8  # popularity weight of the item at popularity rank r is r ** -alpha
P_CATEGORY_SHAPE = 0.6  # items mostly take their category's shape
N_BRANDS = 24
P_HOUSE_BRAND = 0.25  # a brand weakly hints at the colour (brand % 8 == colour)

# Independent random streams, so the catalog and its images do not change with n_users.
_CATALOG, _IMAGES, _USERS, _EVENTS = range(4)
# Purchases per chunk of users (a chunk is at least one user). The default shop is one chunk, drawn
# from the stream [seed, _EVENTS]; chunk c > 0 draws from [seed, _EVENTS, c].
CHUNK_INTERACTIONS = 1_000_000


@dataclass
class SyntheticTruth:
    """The hidden generative attributes, for tests and diagnostics; never shown to a model.

    Item arrays are aligned with ``RawDataset.items`` rows and user arrays with ``users`` rows;
    values index :data:`CATEGORY_NAMES` (for ``n_categories <= 12``), :data:`SHAPES`,
    :data:`COLOURS` and :data:`PATTERNS`.
    """

    item_category: np.ndarray  # (n_items,)
    item_shape: np.ndarray  # (n_items,)
    item_colour: np.ndarray  # (n_items,)
    item_pattern: np.ndarray  # (n_items,)
    item_is_new: np.ndarray  # (n_items,) bool, released on release_day
    user_colours: np.ndarray  # (n_users, 2), primary then secondary
    user_pattern: np.ndarray  # (n_users,)
    user_categories: np.ndarray  # (n_users, min(3, n_categories))
    complement: np.ndarray  # (n_categories,), the likely next category after each category


def generate_synthetic(con: duckdb.DuckDBPyConnection | None = None, **params) -> RawDataset:
    """Generate the synthetic shop: interactions, catalog with in-memory images, and users.

    Takes the arguments of :func:`generate_synthetic_with_truth` (all optional), without its truth.

    Args:
        con: a preparing build's DuckDB connection: the interactions are written into its engine
            table ``inter`` chunk by chunk, and the dataset's ``interactions`` is that table's name. Its
            ``users`` is then empty: the generator gives users no attributes, and every user has
            purchases, so the interactions name them all.
    """
    return generate_synthetic_with_truth(con=con, **params)[0]


def generate_synthetic_with_truth(
    n_users: int = 3000,
    n_items: int = 2000,
    n_interactions: int = 60000,
    n_categories: int = 12,
    image_size: int = 32,
    cold_fraction: float = 0.1,
    days: int = 120,
    release_day: int = 100,
    seed: int = 0,
    con: duckdb.DuckDBPyConnection | None = None,
) -> tuple[RawDataset, SyntheticTruth]:
    """The synthetic shop and the hidden attributes behind it.

    Args:
        n_interactions: exact number of purchases; at least 3 per user.
        image_size: side of the square RGB images, in pixels.
        cold_fraction: share of items released on ``release_day`` (never bought before it).
        days: length of the period that starts on 2024-01-01.
        release_day: day (0-based) the new items go on sale.
        seed: the same seed and arguments give identical output.
        con: see :func:`generate_synthetic`.
    """
    params = dict(locals())  # the arguments, in signature order (recorded in the dataset's sources)
    params.pop("con")
    _check_params(**params)
    complement = complement_map(n_categories)
    catalog = _draw_catalog(n_items, n_categories, cold_fraction, np.random.default_rng([seed, _CATALOG]))
    images = render_images(
        catalog.shape, catalog.colour, catalog.pattern, image_size, np.random.default_rng([seed, _IMAGES])
    )
    users = _draw_users(n_users, n_categories, n_interactions, days, np.random.default_rng([seed, _USERS]))
    item_ids = pd.Series(_ids("S", n_items), dtype="str")
    chunks = []
    row = 0
    for c, (lo, hi) in enumerate(_user_chunks(users.lengths)):
        rng = np.random.default_rng([seed, _EVENTS] if c == 0 else [seed, _EVENTS, c])
        user, item, seconds = _draw_purchases(
            catalog, users.slice(lo, hi), complement, days, release_day, rng
        )
        # The chunk's own user ids only: millions of id strings never exist at once.
        user_ids = pd.Series(_ids("U", n_users, lo, hi), dtype="str")
        frame = _purchase_log(user, item, seconds, user_ids, item_ids)
        if con is None:
            chunks.append(frame)
        else:
            append_frame(con, frame, "inter", first_row=row, create=c == 0)
        row += len(frame)
    interactions = (
        "inter" if con is not None else pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]
    )
    dataset = RawDataset(
        interactions=interactions,
        **_catalog_frames(catalog, item_ids, n_users if con is None else 0, n_categories),
        categorical=["category", "brand"],
        text=["title"],
        images=images,
        sources={"generator": "synthetic", **params},
    )
    truth = SyntheticTruth(
        item_category=catalog.category,
        item_shape=catalog.shape,
        item_colour=catalog.colour,
        item_pattern=catalog.pattern,
        item_is_new=catalog.is_new,
        user_colours=users.colours,
        user_pattern=users.pattern,
        user_categories=users.categories,
        complement=complement,
    )
    return dataset, truth


@dataclass
class _Catalog:
    """Per-item attributes, drawn from the catalog stream."""

    category: np.ndarray
    shape: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    brand: np.ndarray
    is_new: np.ndarray  # bool, released on release_day
    weight: np.ndarray  # popularity weight within any group of items


@dataclass
class _Users:
    """Per-user tastes and activity, drawn from the user stream."""

    categories: np.ndarray  # (n_users, k) preferred categories
    colours: np.ndarray  # (n_users, 2), primary then secondary
    pattern: np.ndarray  # (n_users,)
    signup: np.ndarray  # (n_users,) seconds from the start of the period
    lengths: np.ndarray  # (n_users,) purchases per user

    def slice(self, lo: int, hi: int) -> _Users:
        """Users ``lo`` to ``hi - 1``."""
        return _Users(
            *(a[lo:hi] for a in (self.categories, self.colours, self.pattern, self.signup, self.lengths))
        )


def _user_chunks(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive user ranges of about :data:`CHUNK_INTERACTIONS` purchases each (at least one user)."""
    ends = np.cumsum(lengths)
    bounds = [0]
    while bounds[-1] < len(lengths):
        lo = bounds[-1]
        done = ends[lo - 1] if lo else 0
        hi = int(np.searchsorted(ends, done + CHUNK_INTERACTIONS, side="right"))
        bounds.append(max(hi, lo + 1))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _draw_catalog(
    n_items: int, n_categories: int, cold_fraction: float, rng: np.random.Generator
) -> _Catalog:
    """Categories, visual attributes, brands, the late-released items and their Zipf popularity."""
    n_new = min(round(cold_fraction * n_items), n_items - 1)
    category = rng.permutation(np.arange(n_items) % n_categories)
    shape = np.where(
        rng.random(n_items) < P_CATEGORY_SHAPE, category % len(SHAPES), rng.integers(0, len(SHAPES), n_items)
    )
    colour = rng.integers(0, len(COLOURS), n_items)
    pattern = rng.integers(0, len(PATTERNS), n_items)
    house = colour + len(COLOURS) * rng.integers(0, N_BRANDS // len(COLOURS), n_items)
    brand = np.where(rng.random(n_items) < P_HOUSE_BRAND, house, rng.integers(0, N_BRANDS, n_items))
    is_new = np.zeros(n_items, dtype=bool)
    is_new[rng.choice(n_items, size=n_new, replace=False)] = True
    # Zipf popularity over a random ranking; new items take the top ranks among themselves, so once
    # released they sell like the best sellers.
    rank = np.empty(n_items, dtype=np.int64)
    rank[rng.permutation(n_items)] = np.arange(1, n_items + 1)
    new_rank = np.empty(n_new, dtype=np.int64)
    new_rank[rng.permutation(n_new)] = np.arange(1, n_new + 1)
    weight = rank.astype(np.float64) ** -ZIPF_ALPHA
    weight[is_new] = new_rank.astype(np.float64) ** -ZIPF_ALPHA
    return _Catalog(category, shape, colour, pattern, brand, is_new, weight)


def _first_of_random_orders(rng: np.random.Generator, n_rows: int, n_cols: int, k: int, chunk: int = 1 << 18) -> np.ndarray:
    """The first ``k`` columns of a random order of ``range(n_cols)`` per row, ``(n_rows, k)`` int64.

    The same numbers as ``np.argsort(rng.random((n_rows, n_cols)), axis=1)[:, :k]`` (the generator
    fills rows in order, so drawing them a chunk at a time consumes the same stream), without that
    expression's two full ``(n_rows, n_cols)`` temporaries: at 5M users and 12 categories they were
    1 GB, the peak of a 100M-interaction prepare.
    """
    out = np.empty((n_rows, k), dtype=np.int64)
    for lo in range(0, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        out[lo:hi] = np.argsort(rng.random((hi - lo, n_cols)), axis=1)[:, :k]
    return out


def _draw_users(
    n_users: int, n_categories: int, n_interactions: int, days: int, rng: np.random.Generator
) -> _Users:
    """Preferred categories, colours and pattern, a signup time and a lognormal history length."""
    k = min(N_PREFERRED_CATEGORIES, n_categories)
    categories = _first_of_random_orders(rng, n_users, n_categories, k)
    colours = _first_of_random_orders(rng, n_users, len(COLOURS), 2)
    pattern = rng.integers(0, len(PATTERNS), n_users)
    signup = rng.integers(0, max(1, int(SIGNUP_SPAN * days * SECONDS_PER_DAY)), n_users)
    extra = rng.multinomial(
        n_interactions - MIN_HISTORY * n_users, _normalised(rng.lognormal(0, LENGTH_SIGMA, n_users))
    )
    return _Users(categories, colours, pattern, signup, extra + MIN_HISTORY)


def _draw_purchases(
    catalog: _Catalog,
    users: _Users,
    complement: np.ndarray,
    days: int,
    release_day: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every purchase's user, item and time (seconds from the start), laid out user by user.

    Interactions are in CSR order, each user's purchases in time order: the category follows the
    complement chain, the item within it mostly matches the user's taste.
    """
    lengths = users.lengths
    n_interactions = int(lengths.sum())
    span = days * SECONDS_PER_DAY
    user = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    first = np.zeros(n_interactions, dtype=bool)
    first[np.cumsum(lengths) - lengths] = True
    signup = users.signup[user]
    seconds = signup + (rng.random(n_interactions) * (span - signup)).astype(np.int64)
    seconds = np.sort(user * span + seconds) - user * span  # sorts within each user only

    item_category = _sample_categories(user, first, users.categories, complement, rng)
    released = seconds >= release_day * SECONDS_PER_DAY
    matched = rng.random(n_interactions) < P_TASTE
    want_colour = np.where(
        rng.random(n_interactions) < P_PRIMARY_COLOUR, users.colours[user, 0], users.colours[user, 1]
    )
    n_categories = len(complement)
    sampler = _ItemSampler(
        catalog.category, catalog.colour, catalog.pattern, catalog.is_new, catalog.weight, n_categories
    )
    item = sampler.sample(item_category, want_colour, users.pattern[user], matched, released, rng)
    return user, item, seconds


def _purchase_log(
    user: np.ndarray, item: np.ndarray, seconds: np.ndarray, user_ids: pd.Series, item_ids: pd.Series
) -> pd.DataFrame:
    """One chunk's purchase log in time order (ties keep user order)."""
    order = np.argsort(seconds, kind="stable")
    return pd.DataFrame(
        {
            "user_id": user_ids.array.take(user[order]),
            "item_id": item_ids.array.take(item[order]),
            "timestamp": (START.astype(np.int64) + seconds[order] * 1_000_000_000).view("datetime64[ns]"),
        }
    )


def _catalog_frames(
    catalog: _Catalog, item_ids: pd.Series, n_users: int, n_categories: int
) -> dict[str, pd.DataFrame]:
    """The catalog table and the users (ids only; none for ``n_users=0``: every user has purchases,
    so the interactions name them all)."""
    n_items = len(catalog.category)
    names = category_names(n_categories)
    brands = pd.Series([f"brand {b:02d}" for b in range(N_BRANDS)], dtype="str")
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category": pd.Series(names, dtype="str").array.take(catalog.category),
            "brand": brands.array.take(catalog.brand),
            "title": _titles(names, catalog.category),
            "image_path": pd.Series([None] * n_items, dtype=object),
        }
    )
    return {"items": items, "users": pd.DataFrame({"user_id": pd.Series(_ids("U", n_users), dtype="str")})}


def category_names(n_categories: int) -> list[str]:
    """Names for ``n_categories`` categories: the built-in ones, then numbered ones."""
    return [
        CATEGORY_NAMES[c] if c < len(CATEGORY_NAMES) else f"category {c:02d}" for c in range(n_categories)
    ]


def complement_map(n_categories: int) -> np.ndarray:
    """The likely next category after each category: neighbours pair up, an odd last three cycle."""
    complement = np.arange(n_categories)
    n_pairs = n_categories // 2 - (n_categories % 2 and n_categories >= 3)
    for p in range(n_pairs):
        complement[2 * p], complement[2 * p + 1] = 2 * p + 1, 2 * p
    if n_categories % 2 and n_categories >= 3:
        a = n_categories - 3
        complement[a : a + 3] = [a + 1, a + 2, a]
    return complement


def render_images(
    shape: np.ndarray,
    colour: np.ndarray,
    pattern: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    chunk: int = 2048,
) -> np.ndarray:
    """Render one image per item: a coloured, patterned shape on a light background.

    Position, size, rotation, hue, background and pixel noise are jittered per item, so no two
    images are identical. Masks come from coordinate grids over chunks of items.

    Args:
        shape, colour, pattern: per-item indices into :data:`SHAPES`, :data:`COLOURS`, :data:`PATTERNS`.

    Returns:
        uint8 array (n_items, image_size, image_size, 3).
    """
    n, s = len(shape), image_size
    centre = (s * (0.5 + rng.uniform(-0.08, 0.08, (n, 2)))).astype(np.float32)
    radius = (s * rng.uniform(0.32, 0.42, n)).astype(np.float32)
    angle = rng.uniform(-0.35, 0.35, n)
    fill = np.clip(PALETTE[colour] + rng.normal(0.0, 8.0, (n, 3)), 0, 255)
    # Pattern ink is a darker shade on light colours and a lighter one on dark colours.
    light = fill @ np.array([0.299, 0.587, 0.114]) > 150
    ink = np.where(light[:, None], 0.5 * fill, 0.4 * fill + 153)
    background = rng.uniform(226, 250, (n, 1)) + rng.uniform(-5, 5, (n, 3))
    colours = np.stack([background, fill, ink], axis=1).astype(np.float32)  # (n, 3 levels, RGB)
    period = (s / rng.uniform(5.0, 6.5, n)).astype(np.float32)
    phase = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)

    ys, xs = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5)[:, None]  # (1, S, S) each
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    for lo in range(0, n, chunk):
        b = slice(lo, min(n, lo + chunk))
        dx, dy = xs - centre[b, 0, None, None], ys - centre[b, 1, None, None]  # (B, S, S)
        c, si = cos[b, None, None], sin[b, None, None]
        pu, pv = c * dx + si * dy, c * dy - si * dx  # rotated into the shape's frame
        r = radius[b, None, None]
        inside = _select(shape[b], _SHAPE_MASKS, pu / r, pv / r)
        p = period[b, None, None]
        on_ink = _select(
            pattern[b], _PATTERN_MASKS, pu / p + phase[b, 0, None, None], pv / p + phase[b, 1, None, None]
        )
        level = inside.astype(np.int64) + (inside & on_ink)  # 0 background, 1 fill, 2 ink
        level += 3 * np.arange(lo, b.stop)[:, None, None]
        img = colours.reshape(-1, 3)[level]  # (B, S, S, 3)
        img += rng.integers(-4, 5, img.shape, dtype=np.int8)
        images[b] = np.clip(img, 0, 255)
    return images


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (v <= 0.75) & (np.abs(u) <= (v + 1.0) / 1.75)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 1.0


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return (np.minimum(au, av) <= 0.34) & (np.maximum(au, av) <= 0.95)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d = u * u + v * v
    return (d <= 1.0) & (d >= 0.3)


def _solid(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.zeros(u.shape, dtype=bool)


def _stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.mod((u + v) * 0.75, 1.0) < 0.45


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    fu, fv = np.mod(u, 1.0) - 0.5, np.mod(v, 1.0) - 0.5
    return fu * fu + fv * fv < 0.32**2


def _checks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.floor(u) + np.floor(v)) % 2 == 0


_SHAPE_MASKS = [_circle, _square, _triangle, _diamond, _cross, _ring]  # aligned with SHAPES
_PATTERN_MASKS = [_solid, _stripes, _dots, _checks]  # aligned with PATTERNS


def _select(kind: np.ndarray, masks: list, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per item, the mask of its own kind, computed only for the items of that kind."""
    out = np.zeros(u.shape, dtype=bool)
    for k, mask in enumerate(masks):
        rows = np.flatnonzero(kind == k)
        if len(rows):
            out[rows] = mask(u[rows], v[rows])
    return out


def _sample_categories(
    user: np.ndarray,
    first: np.ndarray,
    user_categories: np.ndarray,
    complement: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The category of every purchase: the previous one's complement, or a fresh preferred one.

    A run of complements after a fresh draw is the fresh category mapped k times through the
    complement permutation, so no loop over positions is needed.
    """
    n = len(user)
    fresh = first | (rng.random(n) >= P_COMPLEMENT)
    slot = rng.integers(0, user_categories.shape[1], n)
    drawn = user_categories[user, slot]
    position = np.arange(n)
    last_fresh = np.maximum.accumulate(np.where(fresh, position, 0))  # never crosses users: first is fresh
    steps = position - last_fresh
    # Complement cycles have length 1, 2 or 3, so its powers repeat every 6 steps.
    powers = [np.arange(len(complement))]
    for _ in range(5):
        powers.append(complement[powers[-1]])
    return np.stack(powers)[steps % 6, drawn[last_fresh]]


class _ItemSampler:
    """Weighted draws within item groups (category x colour x pattern, category x colour, category, all).

    Each group exists before release (old items only) and after (all items, new ones boosted).
    All groups' members sit in one array with a running sum of weights, so a batch of draws from
    different groups is a single ``searchsorted``. An empty group falls back to the wider one.
    """

    def __init__(
        self,
        category: np.ndarray,
        colour: np.ndarray,
        pattern: np.ndarray,
        is_new: np.ndarray,
        weight: np.ndarray,
        n_categories: int,
    ) -> None:
        # Keys: cells first, then (category, colour), then category, then all items.
        self.n_cells = n_categories * len(COLOURS) * len(PATTERNS)
        self.n_colour_keys = n_categories * len(COLOURS)
        self.n_categories = n_categories
        n_keys = self.n_cells + self.n_colour_keys + n_categories + 1
        n_items = len(category)
        item = np.arange(n_items)
        keys = [
            self._cell(category, colour, pattern),
            self._category_colour(category, colour),
            self._category(category),
            np.full(n_items, n_keys - 1),
        ]
        old = ~is_new
        group = np.concatenate([k[old] * 2 for k in keys] + [k * 2 + 1 for k in keys])
        members = np.concatenate([item[old]] * len(keys) + [item] * len(keys))
        weights = np.concatenate([weight[old]] * len(keys) + [weight] * len(keys))
        order = np.argsort(group, kind="stable")
        self.item = members[order]
        self.size = np.bincount(group, minlength=2 * n_keys)
        self.start = np.cumsum(self.size) - self.size
        self.cum = np.concatenate([[0.0], np.cumsum(weights[order])])

    def _cell(self, category: np.ndarray, colour: np.ndarray, pattern: np.ndarray) -> np.ndarray:
        return (category * len(COLOURS) + colour) * len(PATTERNS) + pattern

    def _category_colour(self, category: np.ndarray, colour: np.ndarray) -> np.ndarray:
        return self.n_cells + category * len(COLOURS) + colour

    def _category(self, category: np.ndarray) -> np.ndarray:
        return self.n_cells + self.n_colour_keys + category

    def sample(
        self,
        category: np.ndarray,
        colour: np.ndarray,
        pattern: np.ndarray,
        matched: np.ndarray,
        released: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """One item per row: from the (category, colour, pattern) cell where matched, else the category.

        On a small catalog a cell may be empty (or hold only unreleased items); the draw then keeps
        the colour, and failing that the category, and failing that takes any item.
        """
        period = released.astype(np.int64)
        cell = self._cell(category, colour, pattern) * 2 + period
        by_colour = self._category_colour(category, colour) * 2 + period
        group = self._category(category) * 2 + period
        group = np.where(matched & (self.size[by_colour] > 0), by_colour, group)
        group = np.where(matched & (self.size[cell] > 0), cell, group)
        group = np.where(self.size[group] > 0, group, len(self.size) - 2 + period)  # all items
        lo, hi = self.start[group], self.start[group] + self.size[group]
        x = self.cum[lo] + rng.random(len(group)) * (self.cum[hi] - self.cum[lo])
        position = np.clip(np.searchsorted(self.cum, x, side="right") - 1, lo, hi - 1)
        return self.item[position]


def _check_params(
    n_users: int,
    n_items: int,
    n_interactions: int,
    n_categories: int,
    image_size: int,
    cold_fraction: float,
    days: int,
    release_day: int,
    seed: int,
) -> None:
    if min(n_users, n_items, n_categories, days) < 1:
        raise ValueError("generate_synthetic: n_users, n_items, n_categories and days must be at least 1")
    if n_interactions < MIN_HISTORY * n_users:
        raise ValueError(
            f"generate_synthetic: n_interactions={n_interactions} is below {MIN_HISTORY} per user "
            f"({MIN_HISTORY * n_users} for n_users={n_users})"
        )
    if image_size < 8:
        raise ValueError(f"generate_synthetic: image_size={image_size} is below 8 pixels")
    if not 0.0 <= cold_fraction < 1.0:
        raise ValueError(f"generate_synthetic: cold_fraction={cold_fraction} is outside [0, 1)")


def _normalised(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def _ids(prefix: str, n: int, lo: int = 0, hi: int | None = None) -> list[str]:
    """Ids ``lo`` to ``hi - 1`` (all by default) of ``n``, zero-padded to one width for all ``n``."""
    width = max(6, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(lo, n if hi is None else hi)]


def _titles(names: list[str], category: np.ndarray) -> pd.Series:
    """Titles like "camera 0172", numbered within each category; they carry no visual attribute."""
    number = pd.Series(category).groupby(category).cumcount().to_numpy()
    return pd.Series(
        [f"{names[c]} {k:04d}" for c, k in zip(category.tolist(), number.tolist(), strict=True)], dtype="str"
    )
