"""Word lists the simulated catalogue is drawn from.

Each product type is tied to one of scikit-image's bundled photos (the "object" its pictures show), a taxonomy id
and a price range, so titles, tags, taxonomy, price and pictures of a listing agree with each other, and keyword /
taxonomy / price partitions of `findAllListingsActive` return coherent, predictable subsets.
"""

from __future__ import annotations

from typing import NamedTuple


class Product(NamedTuple):
    nouns: tuple[str, ...]  # one is picked per listing and ends the title
    photo: str  # file in skimage/data (see images.PHOTOS)
    taxonomy_id: int
    price_cents: tuple[int, int]  # inclusive range
    tags: tuple[str, ...]
    materials: tuple[str, ...]


PRODUCTS: tuple[Product, ...] = (
    Product(
        ("coffee mug", "tea cup", "espresso cup"),
        "coffee",
        1062,
        (1200, 4800),
        ("mug", "coffee", "kitchen", "drinkware", "gift for her"),
        ("ceramic", "stoneware", "porcelain", "clay"),
    ),
    Product(
        ("cat portrait", "pet portrait", "cat painting"),
        "chelsea",
        2078,
        (1500, 12000),
        ("cat", "pet", "portrait", "animal art", "cat lover"),
        ("canvas", "paper", "acrylic paint", "watercolor"),
    ),
    Product(
        ("rocket poster", "space launch print", "rocket wall art"),
        "rocket",
        2079,
        (900, 6000),
        ("rocket", "space", "poster", "nursery decor", "science"),
        ("paper", "cotton paper", "canvas"),
    ),
    Product(
        ("motorcycle print", "motorbike poster", "garage wall art"),
        "motorcycle_left",
        2079,
        (1100, 7000),
        ("motorcycle", "biker", "garage", "vintage", "gift for him"),
        ("paper", "metal", "canvas"),
    ),
    Product(
        ("motorcycle photo", "classic bike print"),
        "motorcycle_right",
        2079,
        (1100, 7000),
        ("motorcycle", "photo", "garage", "retro"),
        ("photo paper", "aluminium", "canvas"),
    ),
    Product(
        ("astronaut print", "space portrait", "astronaut poster"),
        "astronaut",
        2079,
        (900, 5000),
        ("astronaut", "space", "portrait", "nasa", "kids room"),
        ("paper", "canvas", "cotton paper"),
    ),
    Product(
        ("vintage camera photo", "photographer print", "film camera art"),
        "camera",
        2080,
        (1000, 4500),
        ("camera", "photography", "black and white", "vintage"),
        ("photo paper", "paper", "canvas"),
    ),
    Product(
        ("coin set", "antique coins", "coin collection"),
        "coins",
        1110,
        (2000, 25000),
        ("coins", "antique", "collectible", "numismatic"),
        ("silver", "bronze", "copper", "brass"),
    ),
    Product(
        ("wall clock", "clock face", "kitchen clock"),
        "clock_motion",
        1063,
        (2500, 9000),
        ("clock", "wall decor", "time", "home decor"),
        ("wood", "metal", "glass", "plastic"),
    ),
    Product(
        ("horse decal", "horse silhouette sticker", "horse wall decal"),
        "horse",
        1081,
        (500, 2500),
        ("horse", "equestrian", "decal", "sticker", "silhouette"),
        ("vinyl", "paper", "wood"),
    ),
    Product(
        ("moon print", "full moon poster", "lunar wall art"),
        "moon",
        2079,
        (800, 5500),
        ("moon", "lunar", "astronomy", "night sky", "celestial"),
        ("paper", "canvas", "cotton paper"),
    ),
    Product(
        ("galaxy print", "deep space poster", "nebula art"),
        "hubble_deep_field",
        2079,
        (900, 6500),
        ("galaxy", "space", "stars", "astronomy", "celestial"),
        ("paper", "canvas", "metal"),
    ),
    Product(
        ("abstract painting", "watercolor abstract", "modern abstract art"),
        "ihc",
        2078,
        (2000, 30000),
        ("abstract", "painting", "modern art", "original art"),
        ("watercolor", "acrylic paint", "canvas"),
    ),
    Product(
        ("eye art print", "iris poster", "optometry art"),
        "retina",
        2079,
        (900, 5000),
        ("eye", "medical art", "optometrist gift", "science"),
        ("paper", "canvas"),
    ),
    Product(
        ("logo sticker", "python sticker", "laptop sticker"),
        "logo",
        1081,
        (300, 1200),
        ("sticker", "laptop", "programmer", "decal", "geek"),
        ("vinyl", "paper"),
    ),
)

ADJECTIVES = (
    "handmade",
    "vintage",
    "personalized",
    "rustic",
    "minimalist",
    "custom",
    "unique",
    "cute",
    "modern",
    "retro",
    "elegant",
    "large",
    "small",
    "colorful",
    "artisan",
    "classic",
    "boho",
    "whimsical",
    "bold",
    "cozy",
)
# Colour words and the hue rotation (degrees) + saturation each applies to the listing's pictures.
COLORS: tuple[tuple[str, float, float], ...] = (
    ("red", 0.0, 1.5),
    ("blue", 200.0, 1.4),
    ("green", 110.0, 1.3),
    ("yellow", 55.0, 1.4),
    ("purple", 270.0, 1.3),
    ("orange", 25.0, 1.5),
    ("pink", 320.0, 1.2),
    ("teal", 170.0, 1.3),
    ("black", 0.0, 0.0),
    ("white", 0.0, 0.25),
    ("brown", 20.0, 0.7),
    ("gold", 45.0, 1.0),
    ("navy", 225.0, 1.1),
    ("mint", 140.0, 0.8),
)
STYLES = ("boho", "farmhouse", "mid century", "scandinavian", "industrial", "cottagecore", "art deco", "japandi")
OCCASIONS = (
    "birthday",
    "christmas",
    "wedding",
    "anniversary",
    "housewarming",
    "graduation",
    "mothers day",
    "fathers day",
)
SHOP_WORDS = ("Studio", "Atelier", "Works", "Co", "Crafts", "Goods", "Shop", "House", "Lab", "Corner")
SHOP_PREFIX = ("Little", "Golden", "Wild", "Blue", "Rusty", "Happy", "Quiet", "Northern", "Paper", "Velvet", "Copper")
COUNTRIES = ("US", "US", "US", "US", "GB", "GB", "DE", "CA", "FR", "AU", "NL", "IT", "ES", "PL", "UA", "IN", "JP")
LANGUAGES = {
    "US": "en-US",
    "GB": "en-GB",
    "DE": "de",
    "CA": "en-US",
    "FR": "fr",
    "AU": "en-GB",
    "NL": "nl",
    "IT": "it",
    "ES": "es",
    "PL": "pl",
    "UA": "en-US",
    "IN": "en-US",
    "JP": "ja",
}
# when_made values of the OAS copy (2025); a few listings carry 2026-era values: the enum changes yearly (API_NOTES).
WHEN_MADE = (
    "made_to_order",
    "made_to_order",
    "2020_2025",
    "2020_2025",
    "2010_2019",
    "2000_2005",
    "1990s",
    "1980s",
    "1970s",
    "before_2006",
)
WHEN_MADE_2026 = ("2020_2026", "before_2007", "2000_2006")
REVIEW_TEXTS = (
    "Absolutely love it, exactly as pictured.",
    "Arrived quickly and well packed. Thank you!",
    "Beautiful work, the colours are even better in person.",
    "Great quality, would buy again.",
    "Took a while to arrive but worth the wait.",
    "Lovely seller, very helpful with my questions.",
    "Smaller than I expected, but nice.",
    "Perfect gift, my sister loved it!",
    "",
    "Not quite what I hoped for.",
)
