"""Train/valid/test assignment: official partitions kept, the rest cut by group BEFORE tiling, seeded.

HistoKT cut splits after tiling with an unseeded shuffle, so patches of one image landed in train and
test. Here whole groups (source image, patient, case, institution: the card's ``group``) go to one split.
The leaky patch-level rule exists only as the explicit ``--split-rule patch`` (see ``patch_splits``).
"""

import random

from histokt.errors import UserError

SPLIT_RULES = ("grouped", "patch")


def cut_points(n: int, ratios: dict[str, float]) -> list[tuple[str, int, int]]:
    """HistoKT's cut by cumulative integer percentages: [start, end) of each split over n items.

    One change for few groups (e.g. Osteosarcoma's 4 patients, where 80/10/10 would leave valid empty):
    each split with a positive ratio and no item takes one from the largest split; with fewer items than
    such splits, the largest ratios get one each. With many items the cut is exactly HistoKT's.
    """
    names = list(ratios)
    # the last split with a positive ratio takes the remainder: ratios that sum to 1 only within the
    # tolerance of check_split_plan never hand an item to a zero-ratio split after it
    last = max((k for k, name in enumerate(names) if ratios[name] > 0), default=len(names) - 1)
    sizes, cum, start = [], 0.0, 0
    for k, name in enumerate(names):
        cum += ratios[name]
        end = n if k >= last else int(round(cum, 9) * n)
        sizes.append(end - start)
        start = end
    wanted = [k for k in range(len(names)) if ratios[names[k]] > 0]
    if n < len(wanted):  # too few for every split: the largest ratios first (ties: test before valid)
        top = sorted(wanted, key=lambda k: (-ratios[names[k]], -k))[:n]
        sizes = [1 if k in top else 0 for k in range(len(names))]
    else:
        for k in wanted:
            if sizes[k] == 0:
                largest = max(range(len(names)), key=lambda j: sizes[j])
                sizes[k] += 1
                sizes[largest] -= 1
    out, start = [], 0
    for name, size in zip(names, sizes):
        out.append((name, start, start + size))
        start += size
    return out


def _shuffled(items: list, seed: int, partition: str) -> list:
    items = list(items)
    random.Random(f"histokt-split:{seed}:{partition}").shuffle(items)
    return items


def check_split_plan(split_plan: dict[str, dict[str, float]], partitions, dataset: str) -> None:
    """Every partition has a rule, and the ratios of each rule sum to 1."""
    missing = sorted(set(partitions) - set(split_plan))
    if missing:
        raise UserError(f"{dataset}: partition {missing[0]!r} has no split rule; verify the download")
    for part, ratios in split_plan.items():
        if abs(sum(ratios.values()) - 1.0) > 1e-6:
            raise UserError(f"{dataset}: split ratios of partition {part!r} sum to {sum(ratios.values())}, not 1")


def grouped_splits(sources, split_plan: dict[str, dict[str, float]], seed: int) -> list[str]:
    """The split of every source (same order as ``sources``), whole groups at a time."""
    by_part: dict[str, list[str]] = {}
    for s in sources:
        by_part.setdefault(s.partition, [])
        if not by_part[s.partition] or by_part[s.partition][-1] != s.group:
            by_part[s.partition].append(s.group)
    group_split: dict[tuple[str, str], str] = {}
    for part, groups in by_part.items():
        groups = _shuffled(sorted(set(groups)), seed, part)
        for name, start, end in cut_points(len(groups), split_plan[part]):
            for g in groups[start:end]:
                group_split[(part, g)] = name
    return [group_split[(s.partition, s.group)] for s in sources]


def patch_splits(partitions: list[str], split_plan: dict[str, dict[str, float]], seed: int) -> list[str]:
    """HistoKT's leaky rule: shuffle the kept PATCHES of each partition and cut; neighbours leak across splits."""
    out = [""] * len(partitions)
    members: dict[str, list[int]] = {}
    for i, part in enumerate(partitions):
        members.setdefault(part, []).append(i)
    for part, idx in members.items():
        idx = _shuffled(idx, seed, part)
        for name, start, end in cut_points(len(idx), split_plan[part]):
            for i in idx[start:end]:
                out[i] = name
    return out
