"""A generated product catalog whose relevance labels are known by construction.

Used by the tests, the demo (when ../shared/data is absent) and as a learnable toy for training.
Each *family* (drills, faucets, ...) has main products (brand x size variants) and accessories.
For a query about a family, with optional brand and size:

- exact:       same family, and the query's brand and size (when stated) match;
- substitute:  same family, but a stated brand or size differs;
- complement:  an accessory made for that family;
- irrelevant:  any product of another family.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd

from labelstore import ids
from labelstore.schemes import load_scheme
from labelstore.store import Store

# family: (product noun, size unit options, accessories, description phrase)
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "drill": ("cordless drill", ("12v", "18v", "20v"), ("drill bit set", "drill battery pack", "drill carrying case"),
              "drives screws and bores holes in wood, metal and masonry"),
    "faucet": ("kitchen faucet", ("single handle", "two handle", "pull down"), ("faucet aerator", "faucet supply line"),
               "mounts on the sink and delivers hot and cold water"),
    "paint": ("interior paint", ("1 gallon", "5 gallon", "1 quart"), ("paint roller kit", "paint tray liner", "painters tape"),
              "covers walls with a washable satin finish"),
    "mower": ("lawn mower", ("21 inch", "30 inch", "self propelled"), ("mower blade", "grass catcher bag"),
              "cuts grass evenly with a mulching deck"),
    "ladder": ("step ladder", ("4 ft", "6 ft", "8 ft"), ("ladder tool tray", "ladder leveler"),
               "gives a stable platform for work at height"),
    "showerhead": ("rain shower head", ("8 inch", "10 inch", "12 inch"), ("shower arm extension", "shower filter cartridge"),
                   "sprays a wide rainfall pattern"),
    "thermostat": ("smart thermostat", ("wifi", "programmable", "touchscreen"), ("thermostat wall plate", "thermostat c-wire adapter"),
                   "controls heating and cooling on a schedule"),
    "saw": ("circular saw", ("7 1/4 inch", "6 1/2 inch", "worm drive"), ("saw blade", "saw guide rail"),
            "makes straight cuts through lumber and plywood"),
    "vacuum": ("shop vacuum", ("5 gallon", "12 gallon", "16 gallon"), ("vacuum filter", "vacuum hose extension"),
               "picks up wet and dry debris"),
    "lightbulb": ("led light bulb", ("60 watt", "75 watt", "100 watt"), ("light bulb changer pole", "dimmer switch"),
                  "gives warm white light at low energy use"),
    "grill": ("gas grill", ("3 burner", "4 burner", "2 burner"), ("grill cover", "grill brush", "propane tank"),
              "cooks outdoors over adjustable burners"),
    "toilet": ("two piece toilet", ("elongated", "round front", "comfort height"), ("toilet seat", "toilet flapper", "wax ring"),
               "flushes with a powerful low water siphon"),
    "mattress": ("memory foam mattress", ("twin", "queen", "king"), ("mattress protector", "bed frame"),
                 "relieves pressure with cooling gel foam"),
    "kettle": ("electric kettle", ("1 liter", "1.7 liter", "gooseneck"), ("kettle descaler", "tea infuser"),
               "boils water quickly with auto shut off"),
}
BRANDS = ("dewalt", "makita", "ryobi", "bosch", "kohler", "moen", "behr", "glidden", "husky", "werner", "ecobee",
          "weber", "philips", "cuisinart", "stanley", "craftsman")


@dataclass
class Catalog:
    """products: product_id, title, description, brand, family, kind ('main'|'accessory'), size.
    queries: query_id, text, family, brand, size.  judgments: query_id, product_id, label (esci), grade."""

    products: pd.DataFrame
    queries: pd.DataFrame
    judgments: pd.DataFrame


def _label(query: dict, product: dict) -> str:
    if product["family"] != query["family"]:
        return "irrelevant"
    if product["kind"] == "accessory":
        return "complement"
    if query["brand"] and product["brand"] != query["brand"]:
        return "substitute"
    if query["size"] and product["size"] != query["size"]:
        return "substitute"
    return "exact"


def generate_catalog(n_families: int = 12, seed: int = 0, brands_per_family: int = 3,
                     irrelevant_per_query: int = 4, dataset: str = "synthetic") -> Catalog:
    """Generate a catalog of `n_families` families (at most len(FAMILIES)) with known ESCI labels.

    Every query is judged against all products of its family, its accessories, and
    `irrelevant_per_query` products of other families.
    """
    rng = random.Random(seed)
    names = list(FAMILIES)[: max(1, min(n_families, len(FAMILIES)))]
    products: list[dict] = []
    for family in names:
        noun, sizes, accessories, phrase = FAMILIES[family]
        for brand in rng.sample(BRANDS, brands_per_family):
            for size in sizes:
                title = f"{brand.title()} {size} {noun}"
                products.append({"family": family, "kind": "main", "brand": brand, "size": size, "title": title,
                                 "description": f"{brand.title()} {noun}, {size}: {phrase}."})
        for accessory in accessories:
            brand = rng.choice(BRANDS)
            products.append({"family": family, "kind": "accessory", "brand": brand, "size": None,
                             "title": f"{brand.title()} {accessory} for {noun}",
                             "description": f"Replacement {accessory} compatible with most {noun} models."})
    for index, product in enumerate(products):
        product["product_id"] = ids.product_id(dataset, f"sku{index:05d}")
    queries: list[dict] = []
    for family in names:
        noun, sizes, _, _ = FAMILIES[family]
        family_brands = sorted({p["brand"] for p in products if p["family"] == family and p["kind"] == "main"})
        candidates = [(None, None), (rng.choice(family_brands), None), (None, rng.choice(sizes)),
                      (rng.choice(family_brands), rng.choice(sizes)), (rng.choice(family_brands), rng.choice(sizes))]
        for brand, size in dict.fromkeys(candidates):
            text = " ".join(part for part in (brand, size, noun) if part)
            queries.append({"query_id": ids.query_id(dataset, text), "text": text, "family": family,
                            "brand": brand, "size": size})
    judgments: list[dict] = []
    grades = load_scheme("esci").grades
    for query in queries:
        own = [p for p in products if p["family"] == query["family"]]
        others = [p for p in products if p["family"] != query["family"]]
        for product in own + rng.sample(others, min(irrelevant_per_query, len(others))):
            label = _label(query, product)
            judgments.append({"query_id": query["query_id"], "product_id": product["product_id"],
                              "label": label, "grade": grades[label]})
    return Catalog(pd.DataFrame(products), pd.DataFrame(queries), pd.DataFrame(judgments))


def catalog_rows(catalog: Catalog, dataset: str = "synthetic") -> pd.DataFrame:
    """The catalog's judgments as normalised ingest rows (the frame `labelstore.ingest.write_pairs` takes)."""
    frame = catalog.judgments.merge(catalog.queries[["query_id", "text"]], on="query_id").merge(
        catalog.products[["product_id", "title", "description", "brand"]], on="product_id")
    frame["pair_id"] = [ids.pair_id(q, p) for q, p in zip(frame["query_id"], frame["product_id"])]
    frame["record_id"] = frame["pair_id"]
    frame["dataset"] = dataset
    frame["source_id"] = frame["product_id"].str.split(":", n=1).str[1]
    frame["attributes"] = None
    frame["raw_rating"] = None
    frame["rating_variance"] = None
    return frame


def write_catalog(store: Store, catalog: Catalog, dataset: str = "synthetic") -> dict[str, int]:
    """Write the catalog's judgments to the store as import labels of the esci scheme."""
    from labelstore.ingest import write_pairs  # ingest imports store; keep module import order simple

    with store.run("ingest", {"source": "generated catalog", "dataset": dataset,
                              "n_judgments": len(catalog.judgments)}) as run:
        inserted = write_pairs(store, catalog_rows(catalog, dataset), "esci", "import:generated-catalog", run.run_id)
        run.metrics.update(inserted)
    return inserted
