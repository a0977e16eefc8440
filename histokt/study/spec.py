"""Experiment specs (`jobs/*.toml`): a whole HistoKT study in one file, checked before anything runs.

    [study]        name, store, run_root, container, protocol ("histokt" or "paper": histokt.protocol's defaults
                   for split rules, card options, trial sources and each cell's --protocol), patch_size (272),
                   target_mpp (1.0), stage_to (each
                   training cell's `histokt train --stage-to`: an absolute node-local folder, which may start
                   with an environment variable expanded on the node, e.g. "$SLURM_TMPDIR", or "off";
                   default: $SLURM_TMPDIR where the site sets it. Not part of any cell's id or record)
    [datasets.X]   card, raw, mpp, options, shards, max_per_class, patches, split_rule, split_seed, filter
                   (X = the dataset's name in the store)
    [stages.standardize], [stages.pretrain], [stages.transfer], [stages.collect]
                   each with a [stages.<stage>.resources] table; pretrain/transfer also take grids and a
                   [stages.<stage>.recipe] table of `histokt train` options.

Every error names the key path (``stages.transfer.lrs[2]``) and what is expected; nothing is submitted.
Relative paths are relative to the directory the command runs in.
"""

import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from histokt.errors import UserError
from histokt.ingest.cards import CARD_NAMES
from histokt.ingest.splits import SPLIT_RULES
from histokt.protocol import DEFAULT as PROTOCOL_DEFAULT
from histokt.protocol import PROTOCOLS, TRIAL_SOURCES
from histokt.train.config import STAGE_OFF, TrainConfig, kept_weights

STAGES = ("standardize", "pretrain", "transfer", "merge", "distill", "collect")
RULES = (
    "kg-select",
    "average",
    "kg-weighted",
    "block-select",
    "stage-select",
    "kappa-select",
)  # histokt.distill.merge's
EVBMF_SEARCHES = ("grid", "reference")  # histokt.distill.evbmf.SEARCHES (that module needs numpy; this one stays light)
INITS = ("random", "imagenet")
MODES = ("fine", "deep")
# train options a spec may not set: the sweep decides them per cell
CELL_OWNED = {"store", "dataset", "out", "init", "mode", "seed", "norm", "nproc", "progress", "protocol"}


@dataclass
class Resources:
    """What a stage's cells ask SLURM for; ``per_dataset`` overrides time and memory for the cells of one
    dataset (the dataset a cell trains on or standardizes), which then go into arrays of their own."""

    gpus: int = 0
    cpus: int = 2
    mem_gb: float = 8.0
    time_min: int = 60
    time_floor_min: int = 0  # sbatch --time-min: the scheduler may shorten the walltime to this to backfill
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    gres: str = ""  # e.g. "gpu:a100:1": GPUs of a type (replaces the plain GPU count)
    extra: list = field(default_factory=list)  # raw sbatch options, e.g. ["--exclusive", "--mail-type=END"]
    array_parallelism: int = 64
    nodes: int = 1
    # DDP ranks per node: 0 = one per GPU (one task without GPUs); N without GPUs: N gloo ranks per node on CPU
    tasks_per_node: int = 0
    max_requeues: int = 0  # a cell checkpointed on a signal is requeued at most this often (0: no cap)
    max_retries: int = 2  # a crashed cell is run again at most this often (histokt.batch.retry)
    per_dataset: dict = field(default_factory=dict)  # {dataset: {"time_min": .., "mem_gb": ..}}

    @property
    def ranks_per_node(self) -> int:
        """DDP ranks (srun tasks) per node: one per GPU, or ``tasks_per_node`` CPU ranks (gloo)."""
        return self.tasks_per_node or max(1, self.gpus)

    def for_dataset(self, name: str | None) -> "Resources":
        """These resources with ``name``'s overrides applied."""
        override = self.per_dataset.get(name, {}) if name else {}
        return dataclasses.replace(self, **override, per_dataset={}) if override else self


@dataclass
class Dataset:
    name: str
    card: str
    raw: str
    mpp: float | None = None
    options: dict = field(default_factory=dict)
    shards: int = 1
    max_per_class: int | None = None  # a quick trial: at most N source images per class and partition
    patches: int | None = None  # an estimate, for costing a study before it is standardized (--dry-run)
    split_rule: str | None = None  # grouped or patch (None: the protocol's)
    split_seed: int = 0
    filter: bool | None = None  # the low-contrast filter (None: the protocol's: off for ADP under the paper's)


@dataclass
class Stage:
    name: str
    resources: Resources = field(default_factory=Resources)
    datasets: list = field(default_factory=list)  # pretrain: sources to train
    sources: list = field(default_factory=list)  # transfer
    targets: list = field(default_factory=list)  # transfer
    inits: list = field(default_factory=lambda: ["random"])
    modes: list = field(default_factory=lambda: ["deep"])
    lrs: str | list[float] = "per-target"  # transfer, distill: "per-target" or a list of floats
    seeds: list = field(default_factory=lambda: [0])
    recipe: dict = field(default_factory=dict)
    include_diagonal: bool = False  # transfer: also source == target
    source_sets: list = field(default_factory=list)  # distill: lists of pretrain datasets merged into one model
    rules: list = field(default_factory=lambda: ["kg-select"])  # distill
    lowrank: list = field(default_factory=lambda: [False])  # distill: without / with the EVBMF low-rank step
    evbmf_search: str | None = None  # distill: "grid" or "reference" (None: histokt merge's default)
    # transfer, distill: "matched" (trial s from source seed s), "first" (all from the first; None: the protocol's)
    trial_sources: str | None = None


@dataclass
class Spec:
    name: str
    store: str
    run_root: str
    container: str = ""
    protocol: str = PROTOCOL_DEFAULT  # histokt.protocol: "histokt" (recommended) or "paper"
    patch_size: int = 272
    target_mpp: float = 1.0
    stage_to: str | None = None  # node-local staging of every training cell (None: histokt train's default)
    max_queued: int | None = None  # most of the study's tasks queued or running at once (None: the sweep's default)
    pool: int | None = None  # workers per pool of task farming (histokt.batch.pool); None/0: one task per cell
    pool_time_min: int | None = None  # a worker's time limit (at least its longest cell's time_min)
    pool_idle_min: float | None = None  # a worker with nothing to run leaves after this long
    datasets: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    text: str = ""  # the file as read, stored in the run root

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


# -- parsing --------------------------------------------------------------------------------------------------

STAGE_KEYS = {
    "standardize": {"resources"},
    "pretrain": {"resources", "datasets", "inits", "seeds", "recipe"},
    "transfer": {
        "resources",
        "sources",
        "targets",
        "inits",
        "modes",
        "lrs",
        "seeds",
        "recipe",
        "include_diagonal",
        "trial_sources",
    },
    "distill": {
        "resources",
        "source_sets",
        "rules",
        "lowrank",
        "targets",
        "inits",
        "lrs",
        "seeds",
        "recipe",
        "evbmf_search",
        "trial_sources",
    },
    "collect": {"resources"},
}


def load(path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the spec ({exc.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    return parse(doc, text, str(path))


def parse(doc: dict, text: str = "", where: str = "spec") -> Spec:
    _keys(doc, {"study", "datasets", "stages"}, "", where)
    study = _table(doc, "study", where)
    _keys(
        study,
        {
            "name",
            "store",
            "run_root",
            "container",
            "protocol",
            "patch_size",
            "target_mpp",
            "stage_to",
            "max_queued",
            "pool",
            "pool_time_min",
            "pool_idle_min",
        },
        "study",
        where,
    )
    spec = Spec(
        name=_get(study, "name", str, "study", where),
        store=_get(study, "store", str, "study", where),
        run_root=_get(study, "run_root", str, "study", where),
        container=_get(study, "container", str, "study", where, default=""),
        protocol=_get(study, "protocol", str, "study", where, default=PROTOCOL_DEFAULT),
        patch_size=_get(study, "patch_size", int, "study", where, default=272),
        target_mpp=_get(study, "target_mpp", float, "study", where, default=1.0),
        stage_to=_get(study, "stage_to", str, "study", where, default=None),
        max_queued=_get(study, "max_queued", int, "study", where, default=None),
        pool=_get(study, "pool", int, "study", where, default=None),
        pool_time_min=_get(study, "pool_time_min", int, "study", where, default=None),
        pool_idle_min=_get(study, "pool_idle_min", float, "study", where, default=None),
        text=text,
    )
    _check_stage_to(spec.stage_to, where)
    if spec.protocol not in PROTOCOLS:
        raise UserError(f"{where}: study.protocol: {spec.protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if spec.max_queued is not None and spec.max_queued < 1:
        raise UserError(f"{where}: study.max_queued: {spec.max_queued} must be at least 1")
    if spec.pool is not None and spec.pool < 0:
        raise UserError(f"{where}: study.pool: {spec.pool} must be at least 0 (0: one task per cell)")
    for key in ("pool_time_min", "pool_idle_min"):
        value = getattr(spec, key)
        if value is not None and not value > 0:
            raise UserError(f"{where}: study.{key}: {value} must be a positive number of minutes")
    if spec.patch_size < 8:
        raise UserError(f"{where}: study.patch_size: {spec.patch_size} must be at least 8")
    _positive(spec.target_mpp, "study.target_mpp", where, "µm/px")
    for name, table in _table(doc, "datasets", where).items():
        spec.datasets[name] = parse_dataset(name, table, where)
    for name, table in _table(doc, "stages", where).items():
        if name not in STAGE_KEYS:  # "merge" is planned from [stages.distill], not written
            raise UserError(f"{where}: stages.{name}: unknown stage; known: {', '.join(STAGES)}")
        spec.stages[name] = _stage(name, table, where)
    _cross_check(spec, where)
    return spec


def parse_dataset(name: str, t, where) -> Dataset:
    """One [datasets.NAME] table, checked (also used for the demo's dataset files)."""
    key = f"datasets.{name}"
    if not isinstance(t, dict):
        raise UserError(f"{where}: {key}: expected a table")
    _keys(
        t,
        {"card", "raw", "mpp", "options", "shards", "max_per_class", "patches", "split_rule", "split_seed", "filter"},
        key,
        where,
    )
    card = _get(t, "card", str, key, where)
    if card not in CARD_NAMES:
        raise UserError(f"{where}: {key}.card: unknown card {card!r}; choose one of {', '.join(CARD_NAMES)}")
    d = Dataset(
        name,
        card,
        _get(t, "raw", str, key, where),
        _get(t, "mpp", float, key, where, default=None),
        _get(t, "options", dict, key, where, default={}),
        _get(t, "shards", int, key, where, default=1),
        _get(t, "max_per_class", int, key, where, default=None),
        _get(t, "patches", int, key, where, default=None),
        _get(t, "split_rule", str, key, where, default=None),
        _get(t, "split_seed", int, key, where, default=0),
        _get(t, "filter", bool, key, where, default=None),
    )
    if d.split_rule is not None and d.split_rule not in SPLIT_RULES:
        raise UserError(f"{where}: {key}.split_rule: {d.split_rule!r}; choose {' or '.join(SPLIT_RULES)}")
    if d.patches is not None and d.patches < 1:
        raise UserError(f"{where}: {key}.patches: {d.patches} must be at least 1 (an estimate of its patch count)")
    if d.mpp is not None:
        _positive(d.mpp, f"{key}.mpp", where, "µm/px")
    if d.shards < 1:
        raise UserError(f"{where}: {key}.shards: {d.shards} must be at least 1")
    if d.max_per_class is not None and d.max_per_class < 1:
        raise UserError(f"{where}: {key}.max_per_class: {d.max_per_class} must be at least 1")
    return d


def _stage(name: str, t, where) -> Stage:
    key = f"stages.{name}"
    if not isinstance(t, dict):
        raise UserError(f"{where}: {key}: expected a table")
    _keys(t, STAGE_KEYS[name], key, where)
    stage = Stage(name=name)
    stage.resources = r = _resources(t.get("resources", {}), f"{key}.resources", where)
    if name in ("standardize", "collect") and r.nodes * r.ranks_per_node > 1:
        raise UserError(
            f"{where}: {key}.resources: nodes = {r.nodes}, gpus = {r.gpus}, tasks_per_node = {r.tasks_per_node}: "
            f"only training stages run several ranks (DDP); a {name} cell is one task: ask for 1"
        )
    for attr, typ in (
        ("datasets", str),
        ("sources", str),
        ("targets", str),
        ("inits", str),
        ("modes", str),
        ("seeds", int),
    ):
        if attr in t:
            setattr(stage, attr, _list(t, attr, typ, key, where))
    if "trial_sources" in t:
        stage.trial_sources = _get(t, "trial_sources", str, key, where)
        if stage.trial_sources not in TRIAL_SOURCES:
            raise UserError(
                f"{where}: {key}.trial_sources: {stage.trial_sources!r}; choose matched (trial s reads source seed "
                f"s) or first (every trial reads the first source seed's model, as the paper)"
            )
    if "include_diagonal" in t:
        stage.include_diagonal = _get(t, "include_diagonal", bool, key, where)
    if "rules" in t:
        stage.rules = _list(t, "rules", str, key, where)
        for i, rule in enumerate(stage.rules):
            if rule not in RULES:
                raise UserError(f"{where}: {key}.rules[{i}]: {rule!r}; choose from {', '.join(RULES)}")
    if "lowrank" in t:
        stage.lowrank = _list(t, "lowrank", bool, key, where)
    if "evbmf_search" in t:
        stage.evbmf_search = _get(t, "evbmf_search", str, key, where)
        if stage.evbmf_search not in EVBMF_SEARCHES:
            raise UserError(f"{where}: {key}.evbmf_search: {stage.evbmf_search!r}; choose grid or reference")
    if "source_sets" in t:
        sets = t["source_sets"]
        if not isinstance(sets, list) or not all(isinstance(x, list) for x in sets):
            raise UserError(f"{where}: {key}.source_sets: expected a list of lists of dataset names")
        for i, members in enumerate(sets):
            stage.source_sets.append(
                [_check_type(v, str, f"{key}.source_sets[{i}][{j}]", where) for j, v in enumerate(members)]
            )
            if len(members) < 2:
                raise UserError(f"{where}: {key}.source_sets[{i}]: merging needs at least 2 datasets")
    for i, init in enumerate(stage.inits):
        if init not in INITS:
            raise UserError(f"{where}: {key}.inits[{i}]: {init!r}; choose from {', '.join(INITS)}")
    for i, mode in enumerate(stage.modes):
        if mode not in MODES:
            raise UserError(f"{where}: {key}.modes[{i}]: {mode!r}; choose from {', '.join(MODES)}")
    if "lrs" in t:
        lrs = t["lrs"]
        if lrs != "per-target":
            lrs = _list(t, "lrs", float, key, where)
            for i, lr in enumerate(lrs):
                _positive(lr, f"{key}.lrs[{i}]", where, "learning rate")
        stage.lrs = lrs
    if "recipe" in t:
        stage.recipe = _recipe(t["recipe"], f"{key}.recipe", where)
        if name in ("transfer", "distill") and "lr" in stage.recipe:
            raise UserError(f"{where}: {key}.recipe.lr: transfer LRs come from {key}.lrs (a list, or 'per-target')")
    return stage


def _resources(t, key, where) -> Resources:
    if not isinstance(t, dict):
        raise UserError(f"{where}: {key}: expected a table")
    known = {f.name: f for f in dataclasses.fields(Resources)}
    _keys(t, set(known), key, where)
    r = Resources()
    for name, value in t.items():
        if name == "per_dataset":
            r.per_dataset = _per_dataset(value, f"{key}.per_dataset", where)
            continue
        typ = float if known[name].type in (float, "float") else type(getattr(r, name))
        setattr(r, name, _check_type(value, typ, f"{key}.{name}", where))
    for i, option in enumerate(r.extra):
        if not (isinstance(option, str) and option.startswith("--") and len(option) > 2):
            raise UserError(f"{where}: {key}.extra[{i}]: {option!r}: expected an sbatch option like '--exclusive'")
    if r.time_floor_min and not 1 <= r.time_floor_min <= r.time_min:
        raise UserError(f"{where}: {key}.time_floor_min: {r.time_floor_min} must be between 1 and time_min")
    for name in ("cpus", "time_min", "array_parallelism", "nodes"):
        if getattr(r, name) < 1:
            raise UserError(f"{where}: {key}.{name}: {getattr(r, name)} is impossible; must be at least 1")
    if r.gpus < 0:
        raise UserError(f"{where}: {key}.gpus: {r.gpus} is impossible; must be at least 0")
    if r.tasks_per_node < 0:
        raise UserError(f"{where}: {key}.tasks_per_node: {r.tasks_per_node} is impossible; must be at least 0")
    if r.gpus and r.tasks_per_node not in (0, r.gpus):
        raise UserError(
            f"{where}: {key}.tasks_per_node: {r.tasks_per_node} with gpus = {r.gpus}: a GPU stage runs one task "
            f"(rank) per GPU; remove tasks_per_node"
        )
    if r.max_requeues < 0:
        raise UserError(f"{where}: {key}.max_requeues: {r.max_requeues} must be at least 0 (0: no cap)")
    if r.max_retries < 0:
        raise UserError(f"{where}: {key}.max_retries: {r.max_retries} must be at least 0 (0: never retried)")
    _positive(r.mem_gb, f"{key}.mem_gb", where, "number of GB")
    return r


def _per_dataset(t, key, where) -> dict:
    """{dataset: {time_min, mem_gb}}: the datasets are checked against [datasets] once all is read."""
    if not isinstance(t, dict):
        raise UserError(f"{where}: {key}: expected a table of datasets, e.g. {key}.mhist = {{ time_min = 10 }}")
    out = {}
    for name, override in t.items():
        if not isinstance(override, dict):
            raise UserError(f"{where}: {key}.{name}: expected a table (time_min, mem_gb)")
        _keys(override, {"time_min", "mem_gb"}, f"{key}.{name}", where)
        if "time_min" in override:
            minutes = _check_type(override["time_min"], int, f"{key}.{name}.time_min", where)
            if minutes < 1:
                raise UserError(f"{where}: {key}.{name}.time_min: {minutes} is impossible; must be at least 1")
        if "mem_gb" in override:
            _positive(
                _check_type(override["mem_gb"], float, f"{key}.{name}.mem_gb", where),
                f"{key}.{name}.mem_gb",
                where,
                "number of GB",
            )
        out[name] = {k: float(v) if k == "mem_gb" else v for k, v in override.items()}
    return out


def _recipe(t, key, where) -> dict:
    if not isinstance(t, dict):
        raise UserError(f"{where}: {key}: expected a table of histokt train options")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, value in t.items():
        if name in CELL_OWNED:
            raise UserError(f"{where}: {key}.{name}: set per cell by the sweep; remove it from the recipe")
        if name == "keep":
            try:
                kept_weights(value)
            except UserError as exc:
                raise UserError(f"{where}: {key}.keep: {exc}") from None
        if name == "stage_to":
            raise UserError(f"{where}: {key}.stage_to: where nodes stage data is set once, as study.stage_to")
        if name not in fields:
            raise UserError(f"{where}: {key}.{name}: unknown train option; see 'histokt train --help'")
        default = fields[name].default
        if name == "lr":  # default None (the recipe's): a number when set
            _positive(_check_type(value, float, f"{key}.{name}", where), f"{key}.{name}", where, "learning rate")
        elif isinstance(default, bool):
            _check_type(value, bool, f"{key}.{name}", where)
        elif isinstance(default, (int, float, str)):
            _check_type(value, type(default), f"{key}.{name}", where)
        elif default is None:  # optional options (optimizer, step_size): the type their annotation names
            _check_type(value, _optional_type(fields[name].type), f"{key}.{name}", where)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{where}: {key}.{name}: {value!r}; choose one of {', '.join(map(str, choices))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: {key}.{name}: {value} must be a finite number")
    return dict(t)


def _check_stage_to(value: str | None, where) -> None:
    """study.stage_to: 'off', or a folder that is absolute on every node (or starts with a variable)."""
    if value is None or value == STAGE_OFF or value.startswith(("/", "$")):
        return
    raise UserError(
        f"{where}: study.stage_to: {value!r}: expected an absolute folder on the nodes' local disk (it may start "
        f'with an environment variable set there, e.g. "$SLURM_TMPDIR/histokt"), or "{STAGE_OFF}"'
    )


def _optional_type(annotation) -> type:
    """X of an ``Optional[X]`` field annotation."""
    return next(a for a in typing.get_args(annotation) if a is not type(None))


def _cross_check(spec: Spec, where) -> None:
    names = set(spec.datasets)
    for stage in spec.stages.values():
        for name in stage.resources.per_dataset:
            if name not in names:
                raise UserError(
                    f"{where}: stages.{stage.name}.resources.per_dataset.{name}: unknown dataset {name!r}; "
                    f"declare it under [datasets.{name}]"
                )
    for stage in spec.stages.values():
        for attr in ("datasets", "sources", "targets"):
            for i, name in enumerate(getattr(stage, attr)):
                if name not in names:
                    raise UserError(
                        f"{where}: stages.{stage.name}.{attr}[{i}]: unknown dataset {name!r}; "
                        f"declare it under [datasets.{name}]"
                    )
    if "distill" in spec.stages:
        d, p = spec.stages["distill"], spec.stages.get("pretrain")
        for i, members in enumerate(d.source_sets):
            for name in members:
                if name not in names:
                    raise UserError(f"{where}: stages.distill.source_sets[{i}]: unknown dataset {name!r}")
                if p is None or name not in p.datasets:
                    raise UserError(
                        f"{where}: stages.distill.source_sets[{i}]: {name!r} is not trained in stages.pretrain"
                    )
        for init in d.inits:
            if p is None or init not in p.inits:
                raise UserError(f"{where}: stages.distill.inits: {init!r} models are not trained in stages.pretrain")
    if "transfer" in spec.stages:
        t, p = spec.stages["transfer"], spec.stages.get("pretrain")
        missing = [s for s in (t.sources or []) if p is None or s not in p.datasets]
        if missing:
            raise UserError(f"{where}: stages.transfer.sources: {missing[0]!r} is not trained in stages.pretrain")
        for init in t.inits:
            if p is None or init not in p.inits:
                raise UserError(f"{where}: stages.transfer.inits: {init!r} models are not trained in stages.pretrain")


# -- writing ----------------------------------------------------------------------------------------------------


def to_toml(doc: dict) -> str:
    """A spec document (tables of strings, numbers, booleans and lists) as TOML that ``tomllib`` reads back
    equal; written by ``histokt demo``, which renders jobs/demo.toml for its output folder."""
    lines: list[str] = []
    _toml_table(doc, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(table: dict, path: list, lines: list) -> None:
    values = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if path and (values or not table):
        lines += ["", "[" + ".".join(_toml_key(k) for k in path) + "]"]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    for k, v in table.items():
        if isinstance(v, dict):
            _toml_table(v, [*path, k], lines)


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii() else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are a subset of TOML's basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"to_toml: {type(value).__name__} values are not written")


# -- small typed getters ---------------------------------------------------------------------------------------

_MISSING = object()


def _keys(t: dict, allowed: set, key: str, where) -> None:
    for k in t:
        if k not in allowed:
            path = f"{key}.{k}" if key else k
            raise UserError(f"{where}: {path}: unknown key; allowed here: {', '.join(sorted(allowed))}")


def _table(doc, name, where) -> dict:
    t = doc.get(name)
    if not isinstance(t, dict):
        raise UserError(f"{where}: [{name}]: missing table")
    return t


def _check_type(value, typ, key, where):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
        raise UserError(f"{where}: {key}: {value!r} is not a {typ.__name__}")
    return value


def _positive(value: float, key: str, where, what: str) -> None:
    """A positive, finite number: refuses 0, negatives, nan and inf (``not x > 0`` alone lets inf through)."""
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{where}: {key}: {value} must be a positive, finite {what}")


def _get(t, name, typ, key, where, default=_MISSING):
    if name not in t:
        if default is _MISSING:
            raise UserError(f"{where}: {key}.{name}: missing")
        return default
    return _check_type(t[name], typ, f"{key}.{name}", where)


def _list(t, name, typ, key, where) -> list:
    value = t[name]
    if not isinstance(value, list):
        raise UserError(f"{where}: {key}.{name}: expected a list")
    return [_check_type(v, typ, f"{key}.{name}[{i}]", where) for i, v in enumerate(value)]
