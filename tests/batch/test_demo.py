"""`histokt demo` (what `make demo` runs): a synthetic collection through the whole pipeline, here and on SLURM."""

import csv
import os
import stat
import subprocess

import pytest
import zarr

from tests.conftest import ROOT, histokt_cmd
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)


def run_demo(out, *extra, umask=-1):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCH_HOME", None)
    return subprocess.run(
        histokt_cmd("demo", "--out", out, "--per-class", "4", "--no-progress", *extra),
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        umask=umask,
    )


def check_modes(out, umask):
    """Every file and folder of the store and the run root has the mode the umask gives: a lab reads them."""
    wrong = []
    for top in (out / "store.zarr", out / "runs"):
        for path in [top, *top.rglob("*")]:
            if path.is_symlink():  # submitit links each job's sbatch file: a link's own mode means nothing
                continue
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            if stat.S_IMODE(path.lstat().st_mode) != want:
                wrong.append(f"{path.relative_to(out)}: {stat.S_IMODE(path.lstat().st_mode):o}, want {want:o}")
    assert not wrong, wrong[:20]


def check_outputs(out):
    store = zarr.open_group(str(out / "store.zarr"), mode="r")
    assert sorted(store.group_keys()) == ["crc", "mhist", "pcam"]
    # each at its own native µm/px, standardized to the spec's 112 px at 1 µm/px
    assert {n: store[n].attrs["mpp_native"] for n in ("crc", "mhist", "pcam")} == {
        "crc": 0.5,
        "mhist": 1.25,
        "pcam": 0.972,
    }
    summary = out / "runs" / "summary"
    for init in ("random", "imagenet"):
        for mode in ("fine", "deep"):
            for ext in ("csv", "md", "tex", "png"):
                assert (summary / f"matrix_{init}_{mode}.{ext}").stat().st_size > 0
    with open(summary / "distill.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # with and without the low-rank step
    report = (summary / "report.md").read_text()
    assert "training cells: 32; done 32, failed 0" in report
    assert (out / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()  # the staged stand-in


def test_demo_runs_the_whole_study_locally(tmp_path):
    r = run_demo(tmp_path, umask=0o002)  # a lab's group-writable umask (the SLURM demo runs under 022)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SYNTHETIC" in r.stderr and "transfer matrices:" in r.stdout
    check_outputs(tmp_path)
    check_modes(tmp_path, 0o002)
    again = run_demo(tmp_path)  # everything is done: nothing runs again
    assert again.returncode == 0 and "finished in 0.0 min" in again.stdout


@pytest.fixture(scope="module")
def slurm_demo(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The demo on SLURM, one task per cell: its folder and the run."""
    out = tmp_path_factory.mktemp("slurm-demo")
    return out, run_demo(out, "--executor", "slurm", umask=0o022)  # sbatch hands the umask to every task


@pytest.mark.slurm
def test_demo_on_slurm(slurm_demo):
    out, r = slurm_demo
    assert r.returncode == 0, r.stderr[-3000:]
    check_outputs(out)
    check_modes(out, 0o022)


@pytest.mark.slurm
def test_demo_as_a_pool_of_two_workers_on_slurm(slurm_demo, tmp_path):
    """--pool 2: one array of 2 workers (the demo's stages are all of one kind), never more than 2 of its
    tasks in the queue (sampled from squeue while it runs), every cell done, and the summary tables byte for
    byte those of the one-task-per-cell demo."""
    import json
    import threading

    arrays_out, arrays_run = slurm_demo
    assert arrays_run.returncode == 0, arrays_run.stderr[-3000:]
    seen: list[int] = []
    stop = threading.Event()

    def sample():
        ledger = tmp_path / "runs" / "submissions.jsonl"
        while not stop.is_set():
            jobs = {json.loads(x)["job"] for x in ledger.read_text().splitlines()} if ledger.exists() else set()
            listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout
            seen.append(sum(t.split("_")[0] in jobs for t in listed.split()))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = run_demo(tmp_path, "--executor", "slurm", "--pool", "2")
    finally:
        stop.set()
        sampler.join()
    assert r.returncode == 0, r.stderr[-3000:]
    check_outputs(tmp_path)
    records = [json.loads(x) for x in (tmp_path / "runs" / "submissions.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["pool"], x["workers"]) for x in records] == [("pool", "cpu", 2)]
    assert len(records[0]["cells"]) == 39 and max(seen) == 2, seen
    summary = tmp_path / "runs" / "summary"
    names = sorted(p.name for p in summary.iterdir() if p.name != "report.md")
    assert names == sorted(p.name for p in (arrays_out / "runs" / "summary").iterdir() if p.name != "report.md")
    for name in names:
        assert (summary / name).read_bytes() == (arrays_out / "runs" / "summary" / name).read_bytes(), name


# -- the demo spec on other data (--raw-root, --datasets) ------------------------------------------------------

TWO = """
[datasets.first]
card = "folder"
raw = "one"
mpp = 0.5
max_per_class = 3

[datasets.second]
card = "crc"
raw = "/elsewhere/two"
"""


def render(tmp_path, datasets_text=None, **kw):
    import tomllib

    from histokt.batch.demo import DemoConfig, demo_spec, write_spec

    if datasets_text is not None:
        (tmp_path / "datasets.toml").write_text(datasets_text)
        kw["datasets"] = tmp_path / "datasets.toml"
    cfg = DemoConfig(out=tmp_path / "out", **kw)
    path = write_spec(cfg, demo_spec(cfg))
    return tomllib.loads(path.read_text())


def test_rendered_synthetic_spec_is_the_template_with_paths(tmp_path):
    import tomllib

    doc = render(tmp_path)
    template = tomllib.loads((ROOT / "jobs" / "demo.toml").read_text())
    assert doc["stages"] == template["stages"]
    assert doc["study"]["run_root"] == str(tmp_path / "out" / "runs")
    assert {n: d["raw"] for n, d in doc["datasets"].items()} == {
        n: str(tmp_path / "out" / "raw" / n) for n in ("crc", "mhist", "pcam")
    }
    assert all("max_per_class" not in d for d in doc["datasets"].values())  # generated at --per-class already


def test_raw_root_caps_real_data_at_per_class(tmp_path):
    doc = render(tmp_path, raw_root=tmp_path / "data" / ".." / "data", per_class=7)
    assert {n: (d["raw"], d["max_per_class"]) for n, d in doc["datasets"].items()} == {
        n: (str(tmp_path / "data" / n), 7) for n in ("crc", "mhist", "pcam")
    }


def test_datasets_file_repoints_every_stage(tmp_path):
    three = TWO + '\n[datasets.third]\ncard = "folder"\nraw = "three"\nmpp = 1.0\n'
    doc = render(tmp_path, three, raw_root=tmp_path / "data", per_class=5)
    assert {n: (d["raw"], d["max_per_class"]) for n, d in doc["datasets"].items()} == {
        "first": (str(tmp_path / "data" / "one"), 3),
        "second": ("/elsewhere/two", 5),
        "third": (str(tmp_path / "data" / "three"), 5),
    }
    st = doc["stages"]
    assert (
        st["pretrain"]["datasets"]
        == st["transfer"]["sources"]
        == st["transfer"]["targets"]
        == ["first", "second", "third"]
    )
    assert st["distill"]["source_sets"] == [["first", "second"]] and st["distill"]["targets"] == ["third"]
    assert st["pretrain"]["recipe"]["epochs"] == 3  # the demo's recipes are kept


def test_two_datasets_run_without_distillation(tmp_path, capsys):
    doc = render(tmp_path, TWO, raw_root=tmp_path)
    assert "distill" not in doc["stages"] and doc["stages"]["transfer"]["targets"] == ["first", "second"]
    assert "no weight distillation" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,message",
    [
        ("[datasets.a]\ncard = 'folder'\nraw = 'a'\n", r"at least two \(found 1\)"),
        (TWO + "\n[stages.pretrain]\n", r"expected only \[datasets.NAME\] tables, at least two \(found stages\)"),
        (TWO.replace('raw = "one"\n', ""), r"datasets.first.raw: missing"),
        (TWO.replace('card = "crc"', 'card = "mnist"'), r"datasets.second.card: unknown card 'mnist'"),
        (TWO.replace("max_per_class = 3", "max_per_class = 0"), r"datasets.first.max_per_class: 0 must be at least 1"),
        ("[datasets.a\n", r"not valid TOML"),
    ],
)
def test_bad_datasets_file_is_one_line(tmp_path, text, message):
    from histokt.errors import UserError

    with pytest.raises(UserError, match=message) as info:
        render(tmp_path, text, raw_root=tmp_path)
    assert str(tmp_path / "datasets.toml") in str(info.value)
    assert not (tmp_path / "out" / "demo.toml").exists()  # nothing written


def test_datasets_needs_raw_root(tmp_path):
    (tmp_path / "d.toml").write_text(TWO)
    r = subprocess.run(
        histokt_cmd("demo", "--out", tmp_path / "out", "--datasets", tmp_path / "d.toml"),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "pass --raw-root DIR too" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
def test_demo_on_the_shared_real_data(shared_data, tmp_path):
    """The issue's real-data run: LC25000 lung (and the NCT samples) as sources, Kather 2016 the tiny target."""
    r = run_demo(tmp_path, "--raw-root", shared_data, "--datasets", ROOT / "jobs" / "demo-shared-data.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "real data from" in r.stderr and "SYNTHETIC" not in r.stderr
    store = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    assert {n: store[n].attrs["mpp_native"] for n in store.group_keys()} == {"lung": 1.0, "nct": 0.5, "kather": 0.495}
    # max_per_class 40 in the file: a seeded 40 of each LC25000 class's 400; --per-class 4 caps Kather's 3 not at all
    lung = [p.split("/")[0] for p in store["lung/sources"][:]]
    assert {c: lung.count(c) for c in set(lung)} == {"lung_aca": 40, "lung_n": 40, "lung_scc": 40}
    assert store["nct"].attrs["classes"] == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    kather = store["kather"]
    kept = {int(i) for s in ("train", "valid", "test") for i in kather[f"{s}/source_id"][:]}
    assert kather["sources"].shape == (24,) and len(kept) == 21  # the three 08_EMPTY glass tiles are filtered
    report = (tmp_path / "runs" / "summary" / "report.md").read_text()
    assert "training cells: 32; done 32, failed 0" in report
    with open(tmp_path / "runs" / "summary" / "distill.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(d["target"], d["sources"]) for d in rows] == [("kather", "lung+nct")] * 2
    with open(tmp_path / "runs" / "summary" / "transfer.csv") as f:
        diagonal = [d for d in csv.DictReader(f) if d["source"] == d["target"] == "lung"]
    # real tissue is learned: LC25000's three classes (chance 1/3), about 32 training images of each
    assert diagonal and all(float(d["test_top1_mean"]) > 0.5 for d in diagonal), diagonal


def test_demo_container_needs_slurm_and_writes_nothing(tmp_path):
    from histokt import cli

    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--container", str(tmp_path / "x.sif")]) == 2
    assert not (tmp_path / "out").exists()
