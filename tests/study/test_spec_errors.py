"""Every check in histokt/study/spec.py, as a table: each bad value gives exactly one line, naming the file and the
key path; the accepted values and defaults are what `parse` returns; `to_toml` writes exactly what it promises."""

import hashlib
import tomllib

import pytest

from histokt.errors import UserError
from histokt.study.spec import Dataset, Resources, Spec, Stage, load, parse, to_toml

W = "jobs/t.toml"
DEL = object()  # an edit that removes the key


def base() -> dict:
    """A valid spec: datasets a and b (their raw folders exist under the test's cwd), both pretrained."""
    return {
        "study": {"name": "t", "store": "s.zarr", "run_root": "runs"},
        "datasets": {"a": {"card": "folder", "raw": "raw/a"}, "b": {"card": "crc", "raw": "raw/b"}},
        "stages": {"pretrain": {"datasets": ["a", "b"]}},
    }


def edited(edits: dict) -> dict:
    doc = base()
    for path, value in edits.items():
        *parents, last = path.split(".")
        t = doc
        for p in parents:
            t = t.setdefault(p, {})
        if value is DEL:
            del t[last]
        else:
            t[last] = value
    return doc


@pytest.fixture
def raw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / "raw" / name).mkdir(parents=True)
    (tmp_path / "raw" / "file").write_text("")
    return tmp_path


TRANSFER = {"stages.transfer.sources": ["a"], "stages.transfer.targets": ["b"]}
DISTILL = {"stages.distill.source_sets": [["a", "b"]], "stages.distill.targets": ["b"]}
CARDS = "adp, mhist, bach, ajlymph, pcam, crc, glas, os, bcss, folder, csv"
RES = "stages.pretrain.resources"
REC = "stages.pretrain.recipe"
LR_FROM = "transfer LRs come from stages.{0}.lrs (a list, or 'per-target')"
NOT_TRAINED = "is not trained in stages.pretrain"
MODELS_NOT_TRAINED = "models are not trained in stages.pretrain"


def case(edits, message, id):
    return pytest.param(edits, message, id=id)


CASES = [
    # -- the document and [study] ------------------------------------------------------------------------------
    case({"colour": 1}, "colour: unknown key; allowed here: datasets, stages, study", "top-unknown"),
    case({"study": DEL}, "[study]: missing table", "study-missing"),
    case({"study": "t"}, "[study]: missing table", "study-not-table"),
    case(
        {"study.colour": "red"},
        "study.colour: unknown key; allowed here: container, max_queued, name, patch_size, pool, pool_idle_min, "
        "pool_time_min, protocol, run_root, stage_to, store, target_mpp",
        "study-unknown",
    ),
    case({f"{REC}.precision": "fp64"}, f"{REC}.precision: 'fp64'; choose one of auto, bf16, fp16, fp32", "choice"),
    case({"study.protocol": "hist"}, "study.protocol: 'hist'; choose histokt or paper", "protocol-bad"),
    case({"study.name": DEL}, "study.name: missing", "name-missing"),
    case({"study.store": DEL}, "study.store: missing", "store-missing"),
    case({"study.run_root": DEL}, "study.run_root: missing", "run_root-missing"),
    case({"study.name": 1}, "study.name: 1 is not a str", "name-type"),
    case({"study.store": 1}, "study.store: 1 is not a str", "store-type"),
    case({"study.run_root": 1}, "study.run_root: 1 is not a str", "run_root-type"),
    case({"study.container": 1}, "study.container: 1 is not a str", "container-type"),
    case({"study.patch_size": "8"}, "study.patch_size: '8' is not a int", "patch_size-str"),
    case({"study.patch_size": True}, "study.patch_size: True is not a int", "patch_size-bool"),
    case({"study.patch_size": 8.0}, "study.patch_size: 8.0 is not a int", "patch_size-float"),
    case({"study.patch_size": 7}, "study.patch_size: 7 must be at least 8", "patch_size-7"),
    case({"study.patch_size": -1}, "study.patch_size: -1 must be at least 8", "patch_size-negative"),
    case({"study.target_mpp": "1"}, "study.target_mpp: '1' is not a float", "target_mpp-str"),
    case({"study.target_mpp": True}, "study.target_mpp: True is not a float", "target_mpp-bool"),
    case({"study.target_mpp": 0}, "study.target_mpp: 0.0 must be a positive, finite µm/px", "target_mpp-0"),
    case({"study.target_mpp": -0.5}, "study.target_mpp: -0.5 must be a positive, finite µm/px", "target_mpp-neg"),
    case({"study.target_mpp": float("inf")}, "study.target_mpp: inf must be a positive, finite µm/px", "mpp-inf"),
    case({"study.target_mpp": float("nan")}, "study.target_mpp: nan must be a positive, finite µm/px", "mpp-nan"),
    case({"datasets": DEL}, "[datasets]: missing table", "datasets-missing"),
    case({"datasets": []}, "[datasets]: missing table", "datasets-not-table"),
    case({"stages": DEL}, "[stages]: missing table", "stages-missing"),
    case({"stages": "pretrain"}, "[stages]: missing table", "stages-not-table"),
    case(
        {"stages.merge": {}},
        "stages.merge: unknown stage; known: standardize, pretrain, transfer, merge, distill, collect",
        "stage-merge-is-planned",
    ),
    case(
        {"stages.finetune": {}},
        "stages.finetune: unknown stage; known: standardize, pretrain, transfer, merge, distill, collect",
        "stage-unknown",
    ),
    # -- [datasets.X] --------------------------------------------------------------------------------------------
    case({"datasets.a": 3}, "datasets.a: expected a table", "dataset-not-table"),
    case(
        {"datasets.b.colour": 1},
        "datasets.b.colour: unknown key; allowed here: card, filter, max_per_class, mpp, options, patches, raw, "
        "shards, split_rule, split_seed",
        "dataset-unknown-key",
    ),
    case({"datasets.a.card": DEL}, "datasets.a.card: missing", "card-missing"),
    case({"datasets.a.split_rule": "tile"}, "datasets.a.split_rule: 'tile'; choose grouped or patch", "split-rule"),
    case({"datasets.a.filter": "no"}, "datasets.a.filter: 'no' is not a bool", "filter"),
    case({"datasets.a.split_seed": "1"}, "datasets.a.split_seed: '1' is not a int", "split-seed"),
    case({"datasets.a.card": 3}, "datasets.a.card: 3 is not a str", "card-type"),
    case({"datasets.a.card": "mnist"}, f"datasets.a.card: unknown card 'mnist'; choose one of {CARDS}", "card-bad"),
    case({"datasets.b.card": "Folder"}, f"datasets.b.card: unknown card 'Folder'; choose one of {CARDS}", "card-case"),
    case({"datasets.a.raw": DEL}, "datasets.a.raw: missing", "raw-missing"),
    case({"datasets.a.raw": 3}, "datasets.a.raw: 3 is not a str", "raw-type"),
    case({"datasets.a.mpp": "x"}, "datasets.a.mpp: 'x' is not a float", "ds-mpp-str"),
    case({"datasets.a.mpp": False}, "datasets.a.mpp: False is not a float", "ds-mpp-bool"),
    case({"datasets.a.mpp": 0}, "datasets.a.mpp: 0.0 must be a positive, finite µm/px", "ds-mpp-0"),
    case({"datasets.a.mpp": -1.0}, "datasets.a.mpp: -1.0 must be a positive, finite µm/px", "ds-mpp-neg"),
    case({"datasets.a.mpp": float("inf")}, "datasets.a.mpp: inf must be a positive, finite µm/px", "ds-mpp-inf"),
    case({"datasets.b.mpp": float("nan")}, "datasets.b.mpp: nan must be a positive, finite µm/px", "ds-mpp-nan"),
    case({"datasets.a.options": "x"}, "datasets.a.options: 'x' is not a dict", "options-str"),
    case({"datasets.a.options": []}, "datasets.a.options: [] is not a dict", "options-list"),
    case({"datasets.a.shards": "2"}, "datasets.a.shards: '2' is not a int", "shards-str"),
    case({"datasets.a.shards": 1.5}, "datasets.a.shards: 1.5 is not a int", "shards-float"),
    case({"datasets.a.shards": 0}, "datasets.a.shards: 0 must be at least 1", "shards-0"),
    case({"datasets.a.shards": -2}, "datasets.a.shards: -2 must be at least 1", "shards-neg"),
    case({"datasets.a.max_per_class": "5"}, "datasets.a.max_per_class: '5' is not a int", "max_per_class-str"),
    case({"datasets.a.max_per_class": True}, "datasets.a.max_per_class: True is not a int", "max_per_class-bool"),
    case({"datasets.a.max_per_class": 0}, "datasets.a.max_per_class: 0 must be at least 1", "max_per_class-0"),
    case({"datasets.a.max_per_class": -1}, "datasets.a.max_per_class: -1 must be at least 1", "max_per_class-neg"),
    # -- each stage's keys ---------------------------------------------------------------------------------------
    case({"stages.pretrain": 3}, "stages.pretrain: expected a table", "pretrain-not-table"),
    case({"stages.standardize": []}, "stages.standardize: expected a table", "standardize-not-table"),
    case({"stages.transfer": "x"}, "stages.transfer: expected a table", "transfer-not-table"),
    case({"stages.distill": 1}, "stages.distill: expected a table", "distill-not-table"),
    case({"stages.collect": True}, "stages.collect: expected a table", "collect-not-table"),
    case(
        {"stages.standardize.datasets": ["a"]},
        "stages.standardize.datasets: unknown key; allowed here: resources",
        "standardize-keys",
    ),
    case({"stages.collect.seeds": [0]}, "stages.collect.seeds: unknown key; allowed here: resources", "collect-keys"),
    case(
        {"stages.pretrain.modes": ["deep"]},
        "stages.pretrain.modes: unknown key; allowed here: datasets, inits, recipe, resources, seeds",
        "pretrain-keys",
    ),
    case(
        {**TRANSFER, "stages.transfer.datasets": ["a"]},
        "stages.transfer.datasets: unknown key; allowed here: "
        "include_diagonal, inits, lrs, modes, recipe, resources, seeds, sources, targets, trial_sources",
        "transfer-keys",
    ),
    case(
        {**TRANSFER, "stages.transfer.trial_sources": "all"},
        "stages.transfer.trial_sources: 'all'; choose matched (trial s reads source seed s) or first (every trial "
        "reads the first source seed's model, as the paper)",
        "trial-sources",
    ),
    case(
        {**DISTILL, "stages.distill.modes": ["deep"]},
        "stages.distill.modes: unknown key; allowed here: "
        "evbmf_search, inits, lowrank, lrs, recipe, resources, rules, seeds, source_sets, targets, trial_sources",
        "distill-keys",
    ),
    case(
        {**DISTILL, "stages.distill.evbmf_search": "brent"},
        "stages.distill.evbmf_search: 'brent'; choose grid or reference",
        "evbmf-search",
    ),
    # -- [stages.X.resources] ------------------------------------------------------------------------------------
    case({RES: 3}, f"{RES}: expected a table", "resources-not-table"),
    case({"stages.collect.resources": []}, "stages.collect.resources: expected a table", "collect-res-not-table"),
    case(
        {f"{RES}.gpu": 1},
        f"{RES}.gpu: unknown key; allowed here: "
        "account, array_parallelism, constraint, cpus, extra, gpus, gres, max_requeues, max_retries, mem_gb, nodes, "
        "partition, per_dataset, qos, tasks_per_node, time_floor_min, time_min",
        "resources-unknown",
    ),
    case({f"{RES}.gpus": "1"}, f"{RES}.gpus: '1' is not a int", "gpus-str"),
    case({f"{RES}.gpus": True}, f"{RES}.gpus: True is not a int", "gpus-bool"),
    case({f"{RES}.gpus": 1.0}, f"{RES}.gpus: 1.0 is not a int", "gpus-float"),
    case({f"{RES}.cpus": "2"}, f"{RES}.cpus: '2' is not a int", "cpus-str"),
    case({f"{RES}.time_min": 1.5}, f"{RES}.time_min: 1.5 is not a int", "time_min-float"),
    case({f"{RES}.array_parallelism": "x"}, f"{RES}.array_parallelism: 'x' is not a int", "array-str"),
    case({f"{RES}.nodes": True}, f"{RES}.nodes: True is not a int", "nodes-bool"),
    case({f"{RES}.mem_gb": "lots"}, f"{RES}.mem_gb: 'lots' is not a float", "mem_gb-str"),
    case({f"{RES}.mem_gb": True}, f"{RES}.mem_gb: True is not a float", "mem_gb-bool"),
    case({f"{RES}.partition": 1}, f"{RES}.partition: 1 is not a str", "partition-type"),
    case({f"{RES}.account": 1.5}, f"{RES}.account: 1.5 is not a str", "account-type"),
    case({f"{RES}.qos": ["x"]}, f"{RES}.qos: ['x'] is not a str", "qos-type"),
    case({f"{RES}.cpus": 0}, f"{RES}.cpus: 0 is impossible; must be at least 1", "cpus-0"),
    case({"study.pool": -1}, "study.pool: -1 must be at least 0 (0: one task per cell)", "pool-neg"),
    case({"study.pool_time_min": 0}, "study.pool_time_min: 0 must be a positive number of minutes", "pool-time-0"),
    case({f"{RES}.max_retries": -1}, f"{RES}.max_retries: -1 must be at least 0 (0: never retried)", "retries-neg"),
    case({f"{RES}.cpus": -1}, f"{RES}.cpus: -1 is impossible; must be at least 1", "cpus-neg"),
    case({f"{RES}.time_min": 0}, f"{RES}.time_min: 0 is impossible; must be at least 1", "time_min-0"),
    case({f"{RES}.array_parallelism": 0}, f"{RES}.array_parallelism: 0 is impossible; must be at least 1", "ap-0"),
    case({f"{RES}.nodes": 0}, f"{RES}.nodes: 0 is impossible; must be at least 1", "nodes-0"),
    case({f"{RES}.gpus": -1}, f"{RES}.gpus: -1 is impossible; must be at least 0", "gpus-neg"),
    case({f"{RES}.mem_gb": 0}, f"{RES}.mem_gb: 0.0 must be a positive, finite number of GB", "mem_gb-0"),
    case({f"{RES}.mem_gb": -4}, f"{RES}.mem_gb: -4.0 must be a positive, finite number of GB", "mem_gb-neg"),
    case({f"{RES}.mem_gb": float("nan")}, f"{RES}.mem_gb: nan must be a positive, finite number of GB", "mem-nan"),
    case({f"{RES}.mem_gb": float("inf")}, f"{RES}.mem_gb: inf must be a positive, finite number of GB", "mem-inf"),
    case(
        {"stages.standardize.resources.time_min": 0},
        "stages.standardize.resources.time_min: 0 is impossible; must be at least 1",
        "standardize-resources",
    ),
    case(
        {**TRANSFER, "stages.transfer.resources.nodes": 0},
        "stages.transfer.resources.nodes: 0 is impossible; must be at least 1",
        "transfer-resources",
    ),
    # -- the grids -----------------------------------------------------------------------------------------------
    case({"stages.pretrain.datasets": "a"}, "stages.pretrain.datasets: expected a list", "datasets-not-list"),
    case({"stages.pretrain.datasets": ["a", 1]}, "stages.pretrain.datasets[1]: 1 is not a str", "datasets-item"),
    case({**TRANSFER, "stages.transfer.sources": "a"}, "stages.transfer.sources: expected a list", "sources-list"),
    case({**TRANSFER, "stages.transfer.sources": ["a", 2]}, "stages.transfer.sources[1]: 2 is not a str", "src-item"),
    case({**TRANSFER, "stages.transfer.targets": "b"}, "stages.transfer.targets: expected a list", "targets-list"),
    case({**TRANSFER, "stages.transfer.targets": [True]}, "stages.transfer.targets[0]: True is not a str", "tgt-item"),
    case({"stages.pretrain.inits": "random"}, "stages.pretrain.inits: expected a list", "inits-not-list"),
    case({"stages.pretrain.inits": [1]}, "stages.pretrain.inits[0]: 1 is not a str", "inits-item"),
    case(
        {"stages.pretrain.inits": ["random", "clip"]},
        "stages.pretrain.inits[1]: 'clip'; choose from random, imagenet",
        "inits-unknown",
    ),
    case(
        {"stages.pretrain.inits": ["ImageNet"]},
        "stages.pretrain.inits[0]: 'ImageNet'; choose from random, imagenet",
        "inits-case",
    ),
    case(
        {**TRANSFER, "stages.transfer.inits": ["random", "scratch"]},
        "stages.transfer.inits[1]: 'scratch'; choose from random, imagenet",
        "transfer-inits-unknown",
    ),
    case({**TRANSFER, "stages.transfer.modes": "deep"}, "stages.transfer.modes: expected a list", "modes-not-list"),
    case({**TRANSFER, "stages.transfer.modes": [1]}, "stages.transfer.modes[0]: 1 is not a str", "modes-item"),
    case(
        {**TRANSFER, "stages.transfer.modes": ["deep", "shallow"]},
        "stages.transfer.modes[1]: 'shallow'; choose from fine, deep",
        "modes-unknown",
    ),
    case(
        {**TRANSFER, "stages.transfer.modes": ["Fine"]},
        "stages.transfer.modes[0]: 'Fine'; choose from fine, deep",
        "modes-case",
    ),
    case({"stages.pretrain.seeds": 0}, "stages.pretrain.seeds: expected a list", "seeds-not-list"),
    case({"stages.pretrain.seeds": [0, "one"]}, "stages.pretrain.seeds[1]: 'one' is not a int", "seeds-str"),
    case({"stages.pretrain.seeds": [True]}, "stages.pretrain.seeds[0]: True is not a int", "seeds-bool"),
    case({"stages.pretrain.seeds": [0.5]}, "stages.pretrain.seeds[0]: 0.5 is not a int", "seeds-float"),
    case({**TRANSFER, "stages.transfer.seeds": [1, 2, "3"]}, "stages.transfer.seeds[2]: '3' is not a int", "t-seeds"),
    case(
        {**TRANSFER, "stages.transfer.include_diagonal": 1},
        "stages.transfer.include_diagonal: 1 is not a bool",
        "diagonal-int",
    ),
    case(
        {**TRANSFER, "stages.transfer.include_diagonal": "true"},
        "stages.transfer.include_diagonal: 'true' is not a bool",
        "diagonal-str",
    ),
    case({**DISTILL, "stages.distill.rules": "average"}, "stages.distill.rules: expected a list", "rules-not-list"),
    case({**DISTILL, "stages.distill.rules": [1]}, "stages.distill.rules[0]: 1 is not a str", "rules-item"),
    case(
        {**DISTILL, "stages.distill.rules": ["average", "max"]},
        "stages.distill.rules[1]: 'max'; choose from kg-select, average, kg-weighted, block-select, stage-select, "
        "kappa-select",
        "rules-unknown",
    ),
    case(
        {**DISTILL, "stages.distill.rules": ["KG-select"]},
        "stages.distill.rules[0]: 'KG-select'; choose from kg-select, average, kg-weighted, block-select, "
        "stage-select, kappa-select",
        "rules-case",
    ),
    case({**DISTILL, "stages.distill.lowrank": True}, "stages.distill.lowrank: expected a list", "lowrank-not-list"),
    case({**DISTILL, "stages.distill.lowrank": [False, 1]}, "stages.distill.lowrank[1]: 1 is not a bool", "lr-item"),
    case(
        {**DISTILL, "stages.distill.source_sets": 3},
        "stages.distill.source_sets: expected a list of lists of dataset names",
        "sets-int",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": "ab"},
        "stages.distill.source_sets: expected a list of lists of dataset names",
        "sets-str",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": ["ab", "ba"]},
        "stages.distill.source_sets: expected a list of lists of dataset names",
        "sets-of-str",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": [["a", "b"], "ab"]},
        "stages.distill.source_sets: expected a list of lists of dataset names",
        "sets-one-str",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": [["a", "b"], ["a", 3]]},
        "stages.distill.source_sets[1][1]: 3 is not a str",
        "sets-item",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": [["a", "b"], ["a"]]},
        "stages.distill.source_sets[1]: merging needs at least 2 datasets",
        "sets-one-member",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": [[]]},
        "stages.distill.source_sets[0]: merging needs at least 2 datasets",
        "sets-empty-member",
    ),
    case({**TRANSFER, "stages.transfer.lrs": "Per-Target"}, "stages.transfer.lrs: expected a list", "lrs-case"),
    case({**TRANSFER, "stages.transfer.lrs": 0.1}, "stages.transfer.lrs: expected a list", "lrs-number"),
    case({**TRANSFER, "stages.transfer.lrs": [1e-3, "x"]}, "stages.transfer.lrs[1]: 'x' is not a float", "lrs-str"),
    case({**TRANSFER, "stages.transfer.lrs": [True]}, "stages.transfer.lrs[0]: True is not a float", "lrs-bool"),
    case(
        {**TRANSFER, "stages.transfer.lrs": [1e-3, 1e-2, 0]},
        "stages.transfer.lrs[2]: 0.0 must be a positive, finite learning rate",
        "lrs-0",
    ),
    case(
        {**TRANSFER, "stages.transfer.lrs": [-1e-3]},
        "stages.transfer.lrs[0]: -0.001 must be a positive, finite learning rate",
        "lrs-neg",
    ),
    case(
        {**TRANSFER, "stages.transfer.lrs": [0.1, float("inf")]},
        "stages.transfer.lrs[1]: inf must be a positive, finite learning rate",
        "lrs-inf",
    ),
    case(
        {**TRANSFER, "stages.transfer.lrs": [float("nan")]},
        "stages.transfer.lrs[0]: nan must be a positive, finite learning rate",
        "lrs-nan",
    ),
    case(
        {**DISTILL, "stages.distill.lrs": [0]},
        "stages.distill.lrs[0]: 0.0 must be a positive, finite learning rate",
        "distill-lrs-0",
    ),
    # -- [stages.X.recipe] ---------------------------------------------------------------------------------------
    case({REC: 3}, f"{REC}: expected a table of histokt train options", "recipe-not-table"),
    *[
        case({f"{REC}.{k}": 1}, f"{REC}.{k}: set per cell by the sweep; remove it from the recipe", f"owned-{k}")
        for k in ("store", "dataset", "out", "init", "mode", "seed", "norm", "nproc", "progress")
    ],
    case({f"{REC}.learning": 1}, f"{REC}.learning: unknown train option; see 'histokt train --help'", "recipe-key"),
    case({f"{REC}.lr": "fast"}, f"{REC}.lr: 'fast' is not a float", "recipe-lr-str"),
    case({f"{REC}.lr": True}, f"{REC}.lr: True is not a float", "recipe-lr-bool"),
    case({f"{REC}.lr": 0}, f"{REC}.lr: 0.0 must be a positive, finite learning rate", "recipe-lr-0"),
    case({f"{REC}.lr": -0.1}, f"{REC}.lr: -0.1 must be a positive, finite learning rate", "recipe-lr-neg"),
    case({f"{REC}.lr": float("inf")}, f"{REC}.lr: inf must be a positive, finite learning rate", "recipe-lr-inf"),
    case({f"{REC}.augment": 1}, f"{REC}.augment: 1 is not a bool", "recipe-bool-int"),
    case({f"{REC}.compile": "yes"}, f"{REC}.compile: 'yes' is not a bool", "recipe-bool-str"),
    case({f"{REC}.epochs": "two"}, f"{REC}.epochs: 'two' is not a int", "recipe-int-str"),
    case({f"{REC}.epochs": True}, f"{REC}.epochs: True is not a int", "recipe-int-bool"),
    case({f"{REC}.batch_size": 2.5}, f"{REC}.batch_size: 2.5 is not a int", "recipe-int-float"),
    case({f"{REC}.weight_decay": "x"}, f"{REC}.weight_decay: 'x' is not a float", "recipe-float-str"),
    case({f"{REC}.momentum": False}, f"{REC}.momentum: False is not a float", "recipe-float-bool"),
    case({f"{REC}.arch": 3}, f"{REC}.arch: 3 is not a str", "recipe-str-int"),
    case({f"{REC}.weight_decay": float("nan")}, f"{REC}.weight_decay: nan must be a finite number", "recipe-nan"),
    case({f"{REC}.gamma": float("inf")}, f"{REC}.gamma: inf must be a finite number", "recipe-inf"),
    case({f"{REC}.ckpt_every_min": float("-inf")}, f"{REC}.ckpt_every_min: -inf must be a finite number", "r-ninf"),
    case({f"{REC}.step_size": float("nan")}, f"{REC}.step_size: nan is not a int", "recipe-none-nan"),
    case(
        {**TRANSFER, "stages.transfer.recipe.lr": 0.1},
        "stages.transfer.recipe.lr: " + LR_FROM.format("transfer"),
        "transfer-recipe-lr",
    ),
    case(
        {**DISTILL, "stages.distill.recipe.lr": 0.1},
        "stages.distill.recipe.lr: " + LR_FROM.format("distill"),
        "distill-recipe-lr",
    ),
    case(
        {**TRANSFER, "stages.transfer.recipe.epochs": "x"},
        "stages.transfer.recipe.epochs: 'x' is not a int",
        "transfer-recipe-type",
    ),
    # -- cross-checks --------------------------------------------------------------------------------------------
    case(
        {"stages.pretrain.datasets": ["a", "c"]},
        "stages.pretrain.datasets[1]: unknown dataset 'c'; declare it under [datasets.c]",
        "pretrain-unknown-dataset",
    ),
    case(
        {**TRANSFER, "stages.transfer.sources": ["c"]},
        "stages.transfer.sources[0]: unknown dataset 'c'; declare it under [datasets.c]",
        "transfer-unknown-source",
    ),
    case(
        {**TRANSFER, "stages.transfer.targets": ["b", "c"]},
        "stages.transfer.targets[1]: unknown dataset 'c'; declare it under [datasets.c]",
        "transfer-unknown-target",
    ),
    case(
        {**DISTILL, "stages.distill.targets": ["c"]},
        "stages.distill.targets[0]: unknown dataset 'c'; declare it under [datasets.c]",
        "distill-unknown-target",
    ),
    case(
        {**DISTILL, "stages.distill.source_sets": [["a", "b"], ["a", "c"]]},
        "stages.distill.source_sets[1]: unknown dataset 'c'",
        "distill-unknown-member",
    ),
    case(
        {**DISTILL, "stages.pretrain.datasets": ["a"]},
        f"stages.distill.source_sets[0]: 'b' {NOT_TRAINED}",
        "distill-member-not-pretrained",
    ),
    case(
        {**DISTILL, "stages.pretrain": DEL},
        f"stages.distill.source_sets[0]: 'a' {NOT_TRAINED}",
        "distill-without-pretrain",
    ),
    case(
        {"stages.distill.inits": ["random", "imagenet"]},
        f"stages.distill.inits: 'imagenet' {MODELS_NOT_TRAINED}",
        "distill-init-not-pretrained",
    ),
    case(
        {"stages.distill.targets": [], "stages.pretrain": DEL},
        f"stages.distill.inits: 'random' {MODELS_NOT_TRAINED}",
        "distill-init-no-pretrain",
    ),
    case(
        {**TRANSFER, "stages.transfer.sources": ["a", "b"], "stages.pretrain.datasets": ["a"]},
        f"stages.transfer.sources: 'b' {NOT_TRAINED}",
        "transfer-source-not-pretrained",
    ),
    case(
        {**TRANSFER, "stages.pretrain": DEL},
        f"stages.transfer.sources: 'a' {NOT_TRAINED}",
        "transfer-without-pretrain",
    ),
    case(
        {**TRANSFER, "stages.transfer.inits": ["imagenet"]},
        f"stages.transfer.inits: 'imagenet' {MODELS_NOT_TRAINED}",
        "transfer-init-not-pretrained",
    ),
    case(
        {"stages.transfer.targets": ["a"], "stages.pretrain": DEL},
        f"stages.transfer.inits: 'random' {MODELS_NOT_TRAINED}",
        "transfer-init-no-pretrain",
    ),
]


@pytest.mark.parametrize("edits,message", CASES)
def test_each_mistake_is_one_line_naming_file_and_key(raw, edits, message):
    doc = edited(edits)
    assert doc != base()
    with pytest.raises(UserError) as exc:
        parse(doc, "", W)
    assert str(exc.value) == f"{W}: {message}"


def test_the_base_spec_and_the_edit_helper_are_valid(raw):
    assert set(parse(base(), "", W).stages) == set(base()["stages"])
    for edits in (TRANSFER, DISTILL, {**TRANSFER, **DISTILL}):
        stages = parse(edited(edits), "", W).stages
        assert {k.split(".")[1] for k in edits if k.startswith("stages.")} <= set(stages)


# -- what parse returns -------------------------------------------------------------------------------------------

MINIMAL = {"study": {"name": "t", "store": "s.zarr", "run_root": "runs"}, "datasets": {}, "stages": {}}


def test_defaults_of_the_records():
    assert Resources() == Resources(
        gpus=0, cpus=2, mem_gb=8.0, time_min=60, partition="", account="", qos="", array_parallelism=64, nodes=1
    )
    stage = Stage(name="x")
    assert (stage.datasets, stage.sources, stage.targets, stage.source_sets) == ([], [], [], [])
    assert (stage.inits, stage.modes, stage.lrs, stage.seeds) == (["random"], ["deep"], "per-target", [0])
    assert (stage.recipe, stage.include_diagonal, stage.rules, stage.lowrank) == ({}, False, ["kg-select"], [False])
    assert stage.resources == Resources()
    d = Dataset("a", "folder", "raw/a")
    assert (d.mpp, d.options, d.shards, d.max_per_class) == (None, {}, 1, None)
    s = Spec("t", "s.zarr", "runs")
    assert (s.container, s.patch_size, s.target_mpp, s.datasets, s.stages, s.text) == ("", 272, 1.0, {}, {}, "")


def test_minimal_spec_takes_the_defaults():
    spec = parse(MINIMAL)
    assert spec == Spec(name="t", store="s.zarr", run_root="runs")
    assert spec.text == "" and spec.digest == hashlib.sha256(b"").hexdigest()[:16]
    assert parse(MINIMAL, "x = 1").digest == hashlib.sha256(b"x = 1").hexdigest()[:16]
    assert parse(MINIMAL, "x = 1").text == "x = 1"


def test_where_defaults_to_spec():
    doc = {**MINIMAL, "study": {**MINIMAL["study"], "patch_size": 7}}
    with pytest.raises(UserError) as exc:
        parse(doc)
    assert str(exc.value) == "spec: study.patch_size: 7 must be at least 8"


def test_empty_stage_tables_take_the_defaults(raw):
    doc = edited({f"stages.{name}": {} for name in ("standardize", "pretrain", "transfer", "distill", "collect")})
    spec = parse(doc, "", W)
    assert list(spec.stages) == ["pretrain", "standardize", "transfer", "distill", "collect"]
    for name, stage in spec.stages.items():
        assert stage == Stage(name=name)
    assert spec.datasets == {"a": Dataset("a", "folder", "raw/a"), "b": Dataset("b", "crc", "raw/b")}


def test_every_value_is_read(raw):
    doc = {
        "study": {
            "name": "n",
            "store": "st.zarr",
            "run_root": "rr",
            "container": "c.sif",
            "patch_size": 8,
            "target_mpp": 2,
        },
        "datasets": {
            "a": {
                "card": "folder",
                "raw": "raw/a",
                "mpp": 0.25,
                "options": {"class_regex": "^x"},
                "shards": 1,
                "max_per_class": 1,
            },
            "b": {"card": "csv", "raw": "raw/b", "mpp": 3, "shards": 4, "max_per_class": 12},
        },
        "stages": {
            "standardize": {"resources": {"gpus": 0, "cpus": 1, "mem_gb": 0.5, "time_min": 1, "nodes": 1}},
            "pretrain": {
                "datasets": ["a", "b"],
                "inits": ["random", "imagenet"],
                "seeds": [0, 3],
                "recipe": {
                    "epochs": 2,
                    "lr": 1,
                    "augment": False,
                    "weight_decay": 0,
                    "arch": "resnet50",
                    "optimizer": "sgd",
                    "ckpt_every_min": 0.5,
                },
                "resources": {
                    "gpus": 2,
                    "partition": "p",
                    "account": "acc",
                    "qos": "q",
                    "array_parallelism": 1,
                    "mem_gb": 16,
                },
            },
            "transfer": {
                "sources": ["a"],
                "targets": ["b", "a"],
                "inits": ["imagenet"],
                "modes": ["fine", "deep"],
                "lrs": "per-target",
                "seeds": [1],
                "recipe": {"epochs": 1},
                "include_diagonal": True,
                "resources": {"time_min": 5},
            },
            "distill": {
                "source_sets": [["a", "b"], ["b", "a", "a"]],
                "rules": ["average", "kg-weighted", "kg-select"],
                "lowrank": [False, True],
                "targets": ["a"],
                "inits": ["random", "imagenet"],
                "lrs": [0.5, 2],
                "seeds": [2],
                "recipe": {"batch_size": 8},
            },
            "collect": {"resources": {"cpus": 4}},
        },
    }
    spec = parse(doc, "text", W)
    expected = Spec(
        name="n",
        store="st.zarr",
        run_root="rr",
        container="c.sif",
        patch_size=8,
        target_mpp=2.0,
        text="text",
        datasets={
            "a": Dataset("a", "folder", "raw/a", 0.25, {"class_regex": "^x"}, 1, 1),
            "b": Dataset("b", "csv", "raw/b", 3.0, {}, 4, 12),
        },
        stages={
            "standardize": Stage("standardize", resources=Resources(gpus=0, cpus=1, mem_gb=0.5, time_min=1, nodes=1)),
            "pretrain": Stage(
                "pretrain",
                datasets=["a", "b"],
                inits=["random", "imagenet"],
                seeds=[0, 3],
                recipe=doc["stages"]["pretrain"]["recipe"],
                resources=Resources(gpus=2, partition="p", account="acc", qos="q", array_parallelism=1, mem_gb=16.0),
            ),
            "transfer": Stage(
                "transfer",
                sources=["a"],
                targets=["b", "a"],
                inits=["imagenet"],
                modes=["fine", "deep"],
                lrs="per-target",
                seeds=[1],
                recipe={"epochs": 1},
                include_diagonal=True,
                resources=Resources(time_min=5),
            ),
            "distill": Stage(
                "distill",
                source_sets=[["a", "b"], ["b", "a", "a"]],
                rules=["average", "kg-weighted", "kg-select"],
                lowrank=[False, True],
                targets=["a"],
                inits=["random", "imagenet"],
                lrs=[0.5, 2.0],
                seeds=[2],
                recipe={"batch_size": 8},
            ),
            "collect": Stage("collect", resources=Resources(cpus=4)),
        },
    )
    assert spec == expected
    # ints where floats belong are read as floats; the recipe is kept as written
    assert type(spec.target_mpp) is float and type(spec.datasets["b"].mpp) is float
    assert type(spec.stages["pretrain"].resources.mem_gb) is float
    assert [type(lr) for lr in spec.stages["distill"].lrs] == [float, float]
    assert type(spec.stages["pretrain"].resources.gpus) is int
    assert spec.stages["pretrain"].recipe == {**doc["stages"]["pretrain"]["recipe"]}
    assert spec.stages["pretrain"].recipe is not doc["stages"]["pretrain"]["recipe"]


@pytest.mark.parametrize(
    "edits",
    [
        {"study.patch_size": 8, "study.target_mpp": 0.001},
        {"datasets.a.mpp": 0.5, "datasets.a.shards": 1, "datasets.a.max_per_class": 1},
        {f"{RES}.gpus": 0, f"{RES}.cpus": 1, f"{RES}.time_min": 1, f"{RES}.array_parallelism": 1, f"{RES}.nodes": 1},
        {f"{RES}.mem_gb": 0.01},
        {f"{REC}.lr": 0.5, f"{REC}.step_size": 3, f"{REC}.optimizer": "adamw", f"{REC}.weight_decay": 1},
        {**TRANSFER, "stages.transfer.lrs": [1e-5, 0.5, 3], "stages.transfer.recipe.epochs": 1},
        {**DISTILL, "stages.distill.recipe.epochs": 1, "stages.distill.lrs": "per-target"},
        {"stages.pretrain.inits": ["imagenet"], **TRANSFER, "stages.transfer.inits": ["imagenet"]},
        {"stages.pretrain.inits": ["imagenet"], "stages.distill.inits": ["imagenet"]},
    ],
)
def test_boundary_values_are_accepted(raw, edits):
    spec = parse(edited(edits), "", W)
    assert spec.name == "t"


def test_learning_rates_are_read_as_floats(raw):
    spec = parse(edited({**TRANSFER, "stages.transfer.lrs": [1e-5, 0.5, 3]}), "", W)
    assert spec.stages["transfer"].lrs == [1e-5, 0.5, 3.0]
    assert type(spec.stages["transfer"].lrs[2]) is float


# -- load ---------------------------------------------------------------------------------------------------------


def test_load_reads_the_file_and_names_it(raw):
    path = raw / "jobs" / "s.toml"
    path.parent.mkdir()
    text = '[study]\nname = "t"\nstore = "s"\nrun_root = "r"\n[datasets]\n[stages]\n'
    path.write_text(text)
    spec = load(str(path))
    assert spec == Spec(name="t", store="s", run_root="r", text=text)
    assert spec.digest == hashlib.sha256(text.encode()).hexdigest()[:16]
    path.write_text(text.replace('run_root = "r"', 'run_root = "r"\npatch_size = 7'))
    with pytest.raises(UserError) as exc:
        load(path)
    assert str(exc.value) == f"{path}: study.patch_size: 7 must be at least 8"
    path.write_text("[study\n")
    with pytest.raises(UserError) as exc:
        load(path)
    assert str(exc.value) == (
        f"{path}: not valid TOML (Expected ']' at the end of a table declaration (at line 1, column 7))"
    )
    with pytest.raises(UserError) as exc:
        load(raw / "nope.toml")
    assert str(exc.value) == f"{raw / 'nope.toml'}: cannot read the spec (No such file or directory)"


# -- to_toml ------------------------------------------------------------------------------------------------------


def test_to_toml_writes_exactly_this():
    doc = {
        "Xa": 1,
        "b": True,
        "c": False,
        "d": 1.5,
        "e": 'é"\n',
        "f": [[1, 2], ["x"], []],
        "": 0,
        "t": {"u": {"v": -2}},
        "w": {},
        "q k": {"é": 1e-5, "y": {}},
    }
    text = to_toml(doc)
    assert text == (
        "Xa = 1\n"
        "b = true\n"
        "c = false\n"
        "d = 1.5\n"
        'e = "é\\"\\n"\n'
        'f = [[1, 2], ["x"], []]\n'
        '"" = 0\n'
        "\n"
        "[t.u]\n"
        "v = -2\n"
        "\n"
        "[w]\n"
        "\n"
        '["q k"]\n'
        '"\\u00e9" = 1e-05\n'  # keys are written ASCII-only, values as they are
        "\n"
        '["q k".y]\n'
    )
    assert tomllib.loads(text) == doc


def test_to_toml_starts_with_a_table_without_a_blank_line():
    assert to_toml({"a": {"b": 1}, "c": {"d": {"e": "x"}}}) == '[a]\nb = 1\n\n[c.d]\ne = "x"\n'
    assert to_toml({}) == "\n"


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"a": None}, "to_toml: NoneType values are not written"),
        ({"a": {"b": [1, (2,)]}}, "to_toml: tuple values are not written"),
    ],
)
def test_to_toml_refuses_what_it_cannot_write(doc, message):
    with pytest.raises(TypeError) as exc:
        to_toml(doc)
    assert str(exc.value) == message


def test_to_toml_round_trips_a_spec(raw):
    doc = edited({**TRANSFER, **DISTILL, "stages.transfer.lrs": [1e-5, 0.5], f"{RES}.mem_gb": 2.5})
    text = to_toml(doc)
    assert tomllib.loads(text) == doc
    assert parse(tomllib.loads(text), text, W) == parse(doc, text, W)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("optimizer", 3, "3 is not a str"),
        ("step_size", "ten", "'ten' is not a int"),
        ("step_size", 2.5, "2.5 is not a int"),
    ],
)
def test_optional_recipe_options_are_type_checked(option, value, expected):
    doc = {
        "study": {"name": "s", "store": "st", "run_root": "r"},
        "datasets": {},
        "stages": {"pretrain": {"recipe": {option: value}}},
    }
    with pytest.raises(UserError) as exc:
        parse(doc, "", "jobs/t.toml")
    assert str(exc.value) == f"jobs/t.toml: stages.pretrain.recipe.{option}: {expected}"
    doc["stages"]["pretrain"]["recipe"] = {"optimizer": "adamw", "step_size": 10}
    assert parse(doc, "", "jobs/t.toml").stages["pretrain"].recipe == {"optimizer": "adamw", "step_size": 10}
