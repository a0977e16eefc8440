"""containers/histokt.def: validated offline (cluster.md §5.3), then, where Apptainer and the image exist
(CI installs the one and builds the other: .ci/run), the real image.

1. Lint: the header comes first (`Bootstrap:` then `From:`), only Apptainer's sections, no `%setup`, every
   `{{ VAR }}` has a default in `%arguments`, every `%files` source exists in the repository.
2. `bash -n` (and `dash -n`: Apptainer runs these sections with /bin/sh) on `%post`, `%test`,
   `%runscript` and `%environment`, with the templates expanded.
3. The install steps: the requirements that `%post` pip-installs equal setup.cfg's pins exactly, torch and
   torchvision included, and the `%test` commands run, with `%environment` sourced first, in this
   project's virtualenv (fast, and it covers the PyTorch base that cannot be pulled here).
4. The real image, built by containers/build.sh from the local Debian base and a wheelhouse: `apptainer
   test`, and the image holds this tree's histokt and the host's Python minor version.
"""

import configparser
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import histokt
from histokt import provenance
from tests.container_image import image  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "containers" / "histokt.def"
INSTALL_DIR = "/opt/histokt"  # where %files puts the project in the image

# Apptainer's definition-file sections (apptainer pkg/build/types/parser/deffile.go)
SECTIONS = {
    "help",
    "setup",
    "files",
    "labels",
    "environment",
    "pre",
    "post",
    "runscript",
    "test",
    "startscript",
    "arguments",
}
APP_SECTIONS = {"appinstall", "applabels", "appfiles", "appenv", "apphelp", "apprun", "appstart", "apptest"}
HEADER_KEYS = {
    "bootstrap",
    "from",
    "stage",
    "registry",
    "namespace",
    "includecmd",
    "mirrorurl",
    "osversion",
    "include",
    "confurl",
    "updateurl",
    "product",
    "user",
    "regcode",
    "productpgp",
    "registerurl",
    "modules",
    "otherurl",
    "fingerprints",
    "setopt",
}
SHELL_SECTIONS = ("post", "test", "runscript", "environment")
TEMPLATE = re.compile(r"{{\s*(\w+)\s*}}")


# ---------------------------------------------------------------- a small .def parser (Apptainer's rules)


@dataclass
class Section:
    name: str
    args: str
    lines: list = field(default_factory=list)

    @property
    def body(self):
        return "\n".join(self.lines) + "\n"


@dataclass
class Definition:
    header: list  # (key, value) in file order, comments and blank lines dropped
    sections: list

    def section(self, name):
        found = [s for s in self.sections if s.name == name]
        assert len(found) == 1, f"expected one %{name} section, found {len(found)}"
        return found[0]

    def arguments(self):
        """%arguments' KEY=VALUE defaults."""
        args = {}
        for line in self.section("arguments").lines:
            if line.strip():
                key, _sep, value = line.strip().partition("=")
                args[key] = value
        return args


def parse_def(text):
    """Split a definition file as Apptainer does: a section starts at a line whose first word starts with %;
    everything before the first section is the header."""
    header, sections = [], []
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            sections.append(Section(words[0][1:].lower(), line.strip()[len(words[0]) :].strip()))
        elif sections:
            sections[-1].lines.append(line)
        elif line.strip() and not line.strip().startswith("#"):
            key, sep, value = line.split("#")[0].partition(":")
            header.append((key.strip().lower(), value.strip() if sep else None))
    return Definition(header, sections)


def expand(text, args):
    """Apptainer's {{ VAR }} templating with the %arguments defaults (or build-arg overrides)."""
    return TEMPLATE.sub(lambda m: args[m.group(1)], text)


def lint(text, root=ROOT):
    """The problems cluster.md §5.3 (1) names, as a list of messages (empty: clean)."""
    problems = []
    d = parse_def(text)
    keys = [k for k, _ in d.header]
    if keys[:2] != ["bootstrap", "from"]:
        problems.append(f"the header must start with Bootstrap: then From:, found {keys[:2]}")
    for key, value in d.header:
        if key not in HEADER_KEYS or value is None:
            problems.append(f"bad header line: {key}")
    names = [s.name for s in d.sections]
    for name in names:
        if name not in SECTIONS and name not in APP_SECTIONS:
            problems.append(f"unknown section %{name}")
    if "setup" in names:
        problems.append("%setup runs on the build host as root: use %files")
    args = {}
    for s in d.sections:
        if s.name == "arguments":
            for line in s.lines:
                if line.strip():
                    m = re.fullmatch(r"\s*([A-Za-z_]\w*)=(\S.*)", line)
                    if not m:
                        problems.append(f"%arguments line is not KEY=default: {line.strip()!r}")
                    else:
                        args[m.group(1)] = m.group(2)
    arg_body = "".join(s.body for s in d.sections if s.name == "arguments")
    used = set(TEMPLATE.findall(text.replace(arg_body, "")))
    for var in sorted(used - set(args)):
        problems.append(f"{{{{ {var} }}}} has no default in %arguments")
    for var in sorted(set(args) - used):
        problems.append(f"%arguments {var} is never used")
    for s in d.sections:
        if s.name == "files":
            if s.args:
                problems.append(f"%files {s.args}: multi-stage copies are not used here")
            for line in s.lines:
                if not line.strip() or line.strip().startswith("#"):
                    continue
                src = shlex.split(expand(line, args))[0]
                if Path(src).is_absolute() or not (root / src).exists():
                    problems.append(f"%files source {src} is not a path in the repository")
    return problems


@pytest.fixture(scope="module")
def text():
    return DEF.read_text()


@pytest.fixture(scope="module")
def definition(text):
    return parse_def(text)


@pytest.fixture(scope="module")
def args(definition):
    return definition.arguments()


def setup_cfg_pins():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines() if ln.strip()]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def logical_lines(script):
    """Shell lines with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", script)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


OPTIONS_WITH_VALUE = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "--target",
    "-t",
    "--prefix",
    "--root",
}


def pip_installs(post):
    """Each `pip install` in %post as (options, requirement strings, local paths)."""
    installs = []
    for line in logical_lines(post):
        words = shlex.split(line)
        if words[:4] == ["python", "-m", "pip", "install"]:
            rest = words[4:]
        elif words[:2] in (["pip", "install"], ["pip3", "install"]):
            rest = words[2:]
        else:
            assert "pip install" not in line, f"unrecognized pip call in %post: {line}"
            continue
        options, reqs, paths = {}, [], []
        it = iter(rest)
        for word in it:
            if word in OPTIONS_WITH_VALUE:
                options[word] = next(it)
            elif word.startswith("-"):
                options[word] = True
            elif word.startswith(("/", ".")):
                paths.append(word)
            else:
                reqs.append(word)
        installs.append((options, reqs, paths))
    return installs


# ---------------------------------------------------------------- 1. lint


def test_lint_is_clean(text):
    assert lint(text) == []


def test_lint_catches_each_problem(tmp_path):
    """The linter itself: each rule fires on a definition that breaks it."""
    (tmp_path / "real.txt").write_text("x")
    good = "Bootstrap: docker\nFrom: img:{{ TAG }}\n\n%arguments\n    TAG=1\n\n%files\n    real.txt /opt/x\n"
    assert lint(good, tmp_path) == []
    cases = {
        "From: img:1\nBootstrap: docker\n%files\n    real.txt /x\n": "must start with Bootstrap",
        good + "%setup\n    touch $APPTAINER_ROOTFS/x\n": "%setup",
        good + "%postt\n    true\n": "unknown section %postt",
        good + "%post\n    echo {{ NOPE }}\n": "{{ NOPE }} has no default",
        good.replace("TAG=1", "TAG=1\n    UNUSED=2"): "UNUSED is never used",
        good.replace("TAG=1", "# a comment\n    TAG=1"): "not KEY=default",
        good + "%files\n    missing.txt /opt/x\n": "missing.txt is not a path",
        good + "%files\n    /etc/passwd /opt/x\n": "/etc/passwd is not a path",
    }
    for bad, message in cases.items():
        problems = lint(bad, tmp_path)
        assert any(message in p for p in problems), (message, problems)


def test_header_pins_a_pytorch_cuda_runtime_image_by_default(definition, args):
    header = dict(definition.header)
    assert (header["bootstrap"], header["from"]) == ("{{ BOOTSTRAP }}", "{{ BASE }}")  # the second base: --build-arg
    assert args["BOOTSTRAP"] == "docker"
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn9-runtime", args["BASE"])
    assert m, f"BASE={args['BASE']} is not a pinned pytorch/pytorch CUDA runtime tag"
    assert m.group(1) == args["TORCH_VERSION"] and m.group(2) == args["CUDA_VERSION"]
    # the torch wheel index must be the base image's CUDA build: cu128 for 12.8
    assert args["CUDA_TAG"] == "cu" + args["CUDA_VERSION"].replace(".", "")


def test_the_local_base_is_debian_with_the_hosts_python():
    """containers/debian.def: bookworm from Debian's archive (no registry), whose python3 is 3.11."""
    base = parse_def((ROOT / "containers" / "debian.def").read_text())
    header = dict(base.header)
    assert header["bootstrap"] == "debootstrap" and header["osversion"] == "bookworm"
    assert sys.version_info[:2] == (3, 11)  # bookworm's python3: submitit pickles need equal minor versions
    assert "python3-venv" in base.section("post").body


def test_files_copy_the_project(definition):
    dests = {}
    for line in definition.section("files").lines:
        if line.strip():
            src, dst = shlex.split(line)
            dests[src] = dst
    assert dests == {name: f"{INSTALL_DIR}/{name}" for name in ("setup.cfg", "setup.py", "README.md", "histokt")}


# ---------------------------------------------------------------- 2. shell syntax


@pytest.mark.parametrize("name", SHELL_SECTIONS)
@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_shell_sections_parse(definition, args, tmp_path, name, shell):
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    script = tmp_path / f"{name}.sh"
    script.write_text(expand(definition.section(name).body, args))
    proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"%{name}: {proc.stderr}"


# ---------------------------------------------------------------- 3. install steps


def test_post_installs_exactly_the_setup_cfg_pins(definition, args):
    pins = setup_cfg_pins()
    installs = pip_installs(expand(definition.section("post").body, args))
    assert installs, "%post installs nothing with pip"
    named = {}
    for options, reqs, paths in installs:
        assert "--no-cache-dir" in options, f"pip install without --no-cache-dir: {reqs or paths}"
        for req in map(Requirement, reqs):
            key = canonicalize_name(req.name)
            assert key not in named, f"{req.name} is installed twice in %post"
            named[key] = req
    assert set(named) == set(pins), (
        f"only in %post: {sorted(set(named) - set(pins))}; only in setup.cfg: {sorted(set(pins) - set(named))}"
    )
    for key, req in named.items():
        assert req.specifier == pins[key].specifier, f"{key}: %post has {req}, setup.cfg has {pins[key]}"
    assert named["torch"].specifier == pins["torch"].specifier  # ==2.14.1, spelled out for the reader
    assert str(named["torchvision"].specifier) == f"=={args['TORCHVISION_VERSION']}"


def test_post_installs_the_pins_then_the_project(definition, args):
    post = expand(definition.section("post").body, args)
    installs = pip_installs(post)
    # torch and torchvision first, from the wheel index of the base image's CUDA build
    options, reqs, _paths = installs[0]
    assert sorted(Requirement(r).name for r in reqs) == ["torch", "torchvision"]
    assert options["--index-url"].endswith("/" + args["CUDA_TAG"])
    # the project last, from where %files put it, when every requirement is already there
    assert [(o, p) for o, r, p in installs if p] == [({"--no-cache-dir": True}, [INSTALL_DIR])]
    assert installs[-1][2] == [INSTALL_DIR]
    assert logical_lines(post)[0] == "set -eu"


def test_files_alone_make_an_installable_project(definition, tmp_path):
    """`pip install --no-deps /opt/histokt` sees only what %files copied: build a wheel from exactly that."""
    project = tmp_path / "opt-histokt"
    for line in definition.section("files").lines:
        if line.strip():
            src, dst = shlex.split(line)
            target = project / Path(dst).relative_to(INSTALL_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)  # as Apptainer does for a %files destination
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / src, target)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("histokt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "histokt").rglob("*.py")}
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "histokt = histokt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_venv_satisfies_the_pins(definition, args):
    """The stand-in for a fresh install: this venv was installed from setup.cfg, which %post equals."""
    for _key, req in setup_cfg_pins().items():
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"venv has {req.name} {installed}, pin {req}"
    py = "{}.{}".format(*sys.version_info[:2])
    assert py == args["PYTHON_VERSION"], "the image's Python must be the submit host's (submitit pickles)"


def _container_env(tmp_path):
    """The environment `apptainer test` would see, here: this venv's bin first (python, histokt)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "MPLBACKEND", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path)  # matplotlib's cache, as a bound HOME
    return env


def _adapt(script, args):
    return expand(script, args).replace(INSTALL_DIR, str(ROOT))


def test_environment_section(definition, args, tmp_path):
    env_script = tmp_path / "environment.sh"
    env_script.write_text(_adapt(definition.section("environment").body, args))
    probe = f'. "{env_script}"; echo "$PYTHONNOUSERSITE $PYTHONUNBUFFERED $OMP_NUM_THREADS $MPLBACKEND"'

    def run(**extra):
        env = _container_env(tmp_path)
        env.update(extra)
        return subprocess.run(["sh", "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.split()

    assert run() == ["1", "1", "1", "Agg"]
    assert run(SLURM_CPUS_PER_TASK="6")[2] == "6"  # one thread per allocated CPU
    assert run(SLURM_CPUS_PER_TASK="6", OMP_NUM_THREADS="3")[2] == "3"  # the caller's choice wins


def test_runscript_execs_histokt(definition, args, tmp_path):
    script = tmp_path / "runscript.sh"
    script.write_text(_adapt(definition.section("runscript").body, args))
    proc = subprocess.run(
        ["sh", str(script), "--version"], env=_container_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("histokt ")


def test_test_section_passes_in_the_venv(definition, args, tmp_path):
    """%test, with %environment sourced first as Apptainer does, in the project's virtualenv."""
    test_body = definition.section("test").body
    for module in (
        "torch",
        "torchvision",
        "submitit",
        "zarr",
        "h5py",
        "PIL",
        "pandas",
        "argparse_dataclass",
        "numpy",
        "tqdm",
        "matplotlib",
    ):
        assert re.search(rf"\bimport\b[^\n]*\b{module}\b", test_body), f"%test does not import {module}"
    assert "histokt --help" in test_body
    script = tmp_path / "test.sh"
    script.write_text(_adapt(definition.section("environment").body + test_body, args))
    proc = subprocess.run(
        ["sh", str(script)], env=_container_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_labels_and_help(definition, args):
    labels = dict(ln.strip().split(None, 1) for ln in definition.section("labels").lines if ln.strip())
    assert labels["org.opencontainers.image.title"] == "histokt"
    assert expand(labels["histokt.torch"], args) == args["TORCH_VERSION"]
    assert "run-cell" in definition.section("help").body
    assert expand(definition.section("runscript").body, args).split() == ["exec", "histokt", '"$@"']


# ---------------------------------------------------------------- the real build, where Apptainer exists


def test_apptainer_test_passes(image):  # noqa: F811
    """The image containers/build.sh built from this tree (CI: .ci/run builds it first, cached): its %test."""
    r = subprocess.run(["apptainer", "test", image], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_the_image_holds_this_trees_histokt_and_the_hosts_python(image, tmp_path):  # noqa: F811
    """What submitit pickles on the host is unpickled in the image: the same Python minor version and the
    same histokt sources, byte for byte."""
    probe = (
        "import hashlib, pathlib, sys, histokt; root = pathlib.Path(histokt.__file__).parent; "
        "print(sys.version_info[0], sys.version_info[1]); "
        "print(*sorted(f'{p.relative_to(root)}:{hashlib.sha256(p.read_bytes()).hexdigest()}' "
        "for p in root.rglob('*.py')))"
    )
    r = subprocess.run(  # in a folder without histokt, as the sweep runs it: no host PYTHONPATH, python -P
        ["apptainer", "exec", "--env", "PYTHONPATH=", image, "python", "-P", "-c", probe],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    version, files = r.stdout.splitlines()
    assert version == f"{sys.version_info[0]} {sys.version_info[1]}"
    root = ROOT / "histokt"
    ours = sorted(f"{p.relative_to(root)}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in root.rglob("*.py"))
    assert files.split() == ours
    # the identity result.json records (histokt.provenance) is the one `apptainer sif header` prints
    r = subprocess.run(["apptainer", "sif", "header", image], capture_output=True, text=True, timeout=300)
    ident = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("ID:"))
    assert provenance.sif_id(str(image)) == ident
    r = subprocess.run(["apptainer", "run", image, "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("histokt "), r.stdout + r.stderr


@pytest.mark.slow
def test_apptainer_run_demo_runs_the_study_from_the_images_install(image, tmp_path):  # noqa: F811
    """`apptainer run histokt.sif demo`: the whole demo study from the image's own (non-editable) histokt, in a
    folder without a checkout, every cell recording the image it ran in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCH_HOME")}
    r = subprocess.run(
        ["apptainer", "run", image, "demo", "--per-class", "4", "--no-progress", "--out", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "demo: finished in" in r.stdout and "transfer matrices:" in r.stdout, r.stdout
    summary = tmp_path / "demo" / "runs" / "summary"
    assert "training cells: 32; done 32, failed 0" in (summary / "report.md").read_text()
    for name in ("matrix_random_deep.csv", "matrix_imagenet_fine.png", "distill.md"):
        assert (summary / name).stat().st_size > 0, name
    results = sorted((tmp_path / "demo" / "runs").rglob("result.json"))
    assert len(results) >= 32
    ident = provenance.sif_id(str(image))
    for path in results:
        runtime = json.loads(path.read_text())["runtime"]
        assert runtime["container"] == {"image": str(image), "sif_id": ident}, path
        assert runtime["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")  # the minor pinned
        assert runtime["histokt"] == histokt.__version__ and runtime["commit"] is None  # installed, no checkout
