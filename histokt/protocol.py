"""The two protocols of a study, and the deviations from the paper that a result states.

``histokt`` (the default, the one we recommend) trains and evaluates without leakage: splits grouped by
source before tiling, a clean validation transform, bf16 where a GPU has it, and a per-family LR choice.
``paper`` reproduces Zhang et al. (ICASSP 2022) as published (docs/method.md §3, §7): patch-level splits,
Adas for Stage A, one LR per target, three trials read from one source checkpoint, validation on augmented
images (ADP excepted), ADP without the low-contrast filter, bilinear BCSS masks, fp32.

Every option that differs from the paper's is a :class:`Deviation`: result.json lists a cell's (its training
options and its dataset's store settings), plan.json the study's (LRs, trial sources), and
``histokt collect --compare-paper`` prints them before any compared matrix. Some cannot be removed (the paper
published no merge code; its shuffles were unseeded): those carry the reason.

Torch-free and store-free: the inputs are plain dicts (a cell's config.json, a dataset's attrs, its settings).
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass

PROTOCOLS = ("histokt", "paper")
DEFAULT = "histokt"

# Stage-B LR per target ("best_lrs"), the same for every source and both families (method.md §3). BCSS uses
# 1e-3 although its sweep favoured 5e-5 (method.md §7 quirk 9): reproduced as published.
TARGET_LR = {
    "adp": 1e-4,
    "bcss": 1e-3,
    "os": 1e-4,
    "crc": 5e-4,
    "ajlymph": 2e-4,
    "bach": 5e-5,
    "glas": 1e-3,
    "mhist": 5e-4,
    "pcam": 1e-3,
}
# The recipe of method.md §3: both stages, then Stage A (Adas runs its own schedule) and Stage B.
RECIPE = {
    "arch": "resnet18",
    "epochs": 250,
    "batch_size": 64,
    "weight_decay": 5e-4,
    "gamma": 0.5,
    "augment": True,
    "crop": 0,
}
STAGE_A = {"optimizer": "adas", "lr": 0.03, "momentum": 0.9, "step_size": 25}
STAGE_B = {"optimizer": "adamp", "scheduler": "step", "step_size": 20}  # lr: TARGET_LR
PATCH_SIZE, MPP, STRIDE = 272, 1.0, 204  # 25 % overlap; a card may have its own (BCSS: 68)
PRECISION = "fp32"
SPLIT_RULE = "patch"
# The paper's card options (method.md §7 quirks 5, 6, 11, 13): what `protocol = "paper"` sets where a spec's
# [datasets.X] options do not.
CARD_OPTIONS: dict[str, dict[str, object]] = {
    "adp": {"level": "L3"},
    "crc": {"variant": "NONORM", "classes": 7, "per_class": 2000, "test": "paper"},
    "pcam": {"per_class": 1000},
    "bcss": {"mask_resize": "bilinear", "split": "grouped"},
}
# ADP was not reprocessed by the paper: its released patches never passed the low-contrast filter.
UNFILTERED = ("adp",)
# The original chose checkpoints on validation images under the training transform, ADP excepted (quirk 3).
CLEAN_VALIDATION = ("adp",)
TRIALS = 3  # each result: mean and sample std over 3 trials
TRIAL_SOURCES = ("matched", "first")  # seed s reads source seed s / every trial reads the first source seed


@dataclass(frozen=True)
class Deviation:
    """One way a run differs from the paper: what, ours, the paper's, and why it stays (if it cannot go)."""

    what: str
    ours: str
    paper: str
    fixed: str = ""  # non-empty: cannot be removed, and why

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "Deviation":
        return cls(str(doc["what"]), str(doc["ours"]), str(doc["paper"]), str(doc.get("fixed", "")))


# What no protocol can remove, with the reason (stated on every comparison).
FIXED = (
    Deviation(
        "split shuffles",
        "seeded (split_seed, trial seeds recorded)",
        "unseeded random.shuffle",
        "the original's splits and seeds cannot be recovered (method.md §7 quirk 2)",
    ),
)
# What the original's code and paper leave open about a dataset: stated on every cell of it, as fixed.
UNKNOWN = {
    "adp": Deviation(
        "adp level", "L3 (33 classes)", "not stated", "the paper does not say which ADP level it trained (quirk 11)"
    ),
    "bcss": Deviation(
        "bcss patch labels",
        "label_threshold, presence and stride as the store records",
        "not published",
        "the original's BCSS binarization rule and overlap are not in its code (method.md §7 quirks 12, 13)",
    ),
    "pcam": Deviation(
        "pcam test split", "the official test split", "uncertain", "the original's PCam test set is not certain"
    ),
}
MERGE_FIXED = Deviation(
    "merge rule",
    "histokt's rules (kg-select, average, kg-weighted, block/stage-select, kappa-select)",
    "unpublished",
    "the paper's merge script is in no public commit (method.md §4.1)",
)


def card_of(attrs: Mapping) -> str | None:
    """The card a dataset was standardized with (its attrs), or None where they do not say."""
    card = (attrs.get("card") or {}).get("card")
    return card if isinstance(card, str) else None


def valid_transform(protocol: str, card: str) -> str:
    """The validation transform a protocol uses on ``card``: "train" (augmented) or "clean"."""
    return "train" if protocol == "paper" and card not in CLEAN_VALIDATION else "clean"


def card_options(protocol: str, card: str, given: dict) -> dict:
    """A dataset's card options under ``protocol``: the paper's where the spec gives none of its own."""
    return {**CARD_OPTIONS.get(card, {}), **given} if protocol == "paper" else dict(given)


def _card_defaults(card: str) -> tuple[dict, int | None, float | None]:
    """A card's option defaults, its overlap and native µm/px (an unknown card: none)."""
    from histokt.ingest.cards import CARD_NAMES, card_class

    if card not in CARD_NAMES:
        return {}, None, None
    cls = card_class(card)
    return dict(cls.OPTION_DEFAULTS), cls.default_stride, cls.mpp


def _cuts(split_plan: Mapping | None) -> bool:
    """Whether a split plan cuts any partition (an official split kept whole is the same under either rule)."""
    if not split_plan:
        return True  # not recorded: assume it does
    return any(sum(1 for r in ratios.values() if r > 0) > 1 for ratios in split_plan.values())


def store_deviations(card: str, dataset: Mapping) -> list[Deviation]:
    """How a dataset as standardized (its attrs) differs from the paper's data. An option the attrs do not
    record is the card's default (a store made before the option existed ran it)."""
    defaults, overlap, mpp = _card_defaults(card)
    out = []
    rule = dataset.get("split_rule", "grouped")
    if rule != SPLIT_RULE and _cuts(dataset.get("split_plan")):
        out.append(Deviation(f"{card} split", f"{rule} (whole sources per split)", "patch-level after tiling"))
    options = (dataset.get("card") or {}).get("options", {})
    for key, paper in CARD_OPTIONS.get(card, {}).items():
        ours = options.get(key, defaults.get(key))
        if ours != paper:
            out.append(Deviation(f"{card} option {key}", str(ours), str(paper)))
    filtered = dataset.get("filter") is not None  # attrs "filter": its parameters, null when off
    if filtered == (card in UNFILTERED):
        paper_filter = "off (released patches, not reprocessed)" if card in UNFILTERED else "on"
        out.append(Deviation(f"{card} low-contrast filter", "on" if filtered else "off", paper_filter))
    out += _geometry_deviations(card, dataset, overlap, mpp)
    return out + ([UNKNOWN[card]] if card in UNKNOWN else [])


def _geometry_deviations(card: str, dataset: Mapping, overlap: int | None, mpp: float | None) -> list[Deviation]:
    """Patch size, resolution, overlap and subsets: 272 px at 1 µm/px with the card's overlap, every image."""
    out = []
    size = dataset.get("patch_size", PATCH_SIZE)
    if size != PATCH_SIZE or dataset.get("mpp_target", MPP) != MPP:
        out.append(Deviation("patches", f"{size} px at {dataset.get('mpp_target')} µm/px", "272 px at 1 µm/px"))
    stride = round((overlap or STRIDE) * size / PATCH_SIZE)
    if dataset.get("stride", stride) != stride:
        out.append(Deviation(f"{card} stride", str(dataset.get("stride")), str(stride)))
    if mpp is not None and dataset.get("mpp_native", mpp) != mpp:
        out.append(Deviation(f"{card} native µm/px", str(dataset.get("mpp_native")), str(mpp)))
    if dataset.get("max_per_class") is not None:
        n = dataset["max_per_class"]
        out.append(Deviation(f"{card} subset", f"at most {n} source images per class", "the whole download"))
    return out


def cell_deviations(card: str, config: Mapping, settings: Mapping, dataset: Mapping) -> list[Deviation]:
    """How one training cell differs from the paper: its options (config.json), how it computed (settings)
    and its dataset (attrs). Epochs and batch size count too: a demo's 2 epochs are not the paper's 250."""
    out = store_deviations(card, dataset)
    stage = "A" if config.get("mode") == "scratch" else "B"
    recipe = {**RECIPE, **(STAGE_A if stage == "A" else STAGE_B)}
    if stage == "B" and card in TARGET_LR:
        recipe["lr"] = TARGET_LR[card]
    for key, paper in recipe.items():
        ours = config.get(key)
        if ours != paper:
            what = key if key in RECIPE else f"stage {stage} {key}"
            out.append(
                Deviation(what, _text(ours), _text(paper) + (" (best_lrs)" if key == "lr" and stage == "B" else ""))
            )
    ours, paper = config.get("valid_transform", "clean"), valid_transform("paper", card)
    if ours != paper:
        out.append(Deviation(f"{card} validation transform", ours, paper))
    if settings.get("precision", PRECISION) != PRECISION:
        out.append(Deviation("precision", str(settings["precision"]), PRECISION))
    return out


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def study_deviations(lrs_fixed: bool, trial_sources: str, merges: bool, trials: int = TRIALS) -> list[Deviation]:
    """How a study's plan differs from the paper's: the LR choice, where trials start and how many (the fewest
    seeds of a training stage), and what cannot go."""
    out = []
    if trials != TRIALS:
        out.append(Deviation("trials per result", str(trials), str(TRIALS)))
    if not lrs_fixed:
        out.append(Deviation("transfer LR", "a grid, the best chosen per family, mode and target", "best_lrs table"))
    if trial_sources != "first":
        out.append(Deviation("trials", "trial s starts from source seed s", "all trials start from one source model"))
    return [*out, *FIXED, *([MERGE_FIXED] if merges else [])]


def merged(groups) -> list[tuple[Deviation, int]]:
    """Deviations of many cells, each once with the number of cells it applies to, in first-seen order."""
    counts: dict[Deviation, int] = {}
    for deviations in groups:
        for d in dict.fromkeys(deviations):
            counts[d] = counts.get(d, 0) + 1
    return list(counts.items())
